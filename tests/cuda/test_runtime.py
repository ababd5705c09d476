"""The CUDA runtime's host side, checked on the CPU: CuPy stays unimported until a launch, a
missing CuPy names the extra, kernel sources are found and parsed, every argument is checked
and converted to its exact C type, modules compile once per (source, dtypes, device), and the
typed launchers pass the arguments of the C signatures. The kernels themselves run in the `gpu`
tests."""

import subprocess
import sys
import types
from pathlib import Path

import eightbit.functional.cuda as optim_cuda
import eightbit.quant.cuda as quant_cuda
import numpy as np
import pytest
import torch
from eightbit.functional._chunked import Quantized
from eightbit.functional.cuda import _launch
from eightbit.quant import get_codebook, num_blocks
from eightbit.quant.cuda import _runtime

SOURCES = sorted(quant_cuda.KERNEL_DIR.glob("*.cu")) + sorted(optim_cuda.KERNEL_DIR.glob("*.cu"))
NUMPY_OF_CTYPE = {
    "long long": np.int64,
    "int": np.int32,
    "float": np.float32,
    "double": np.float64,
}


def test_importing_eightbit_does_not_import_cupy():
    code = (
        "import sys, eightbit, eightbit.quant, eightbit.functional, eightbit.optim, "
        "eightbit.quant.cuda, eightbit.functional.cuda\n"
        "import eightbit.quant.cuda._runtime, eightbit.functional.cuda._launch\n"
        "assert 'cupy' not in sys.modules, 'cupy was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def no_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    _runtime.cupy.cache_clear()
    yield
    _runtime.cupy.cache_clear()


def test_cuda_tensor_without_cupy_names_the_extra(no_cupy):
    with pytest.raises(ImportError, match=r"eightbit\[cuda12\].*eightbit\[cuda13\]"):
        _runtime.cupy()
    # The first launch for a CUDA tensor compiles, which needs CuPy: the same message.
    source = quant_cuda.KERNEL_DIR / "blockwise.cu"
    device = torch.device("cuda", 0)
    with pytest.raises(ImportError, match=r"pip install 'eightbit\[cuda12\]'"):
        _runtime.get_kernel(source, "quantize_blockwise_kernel", (torch.float32,), device)


def test_cpu_tensor_is_refused_before_any_launch():
    with pytest.raises(ValueError, match="need CUDA tensors"):
        quant_cuda.quantize(
            torch.ones(8), torch.empty(8, dtype=torch.uint8), torch.empty(1), get_codebook(), 64
        )


# ------------------------------------------------------------------------- sources and parsing


def test_kernel_sources_are_package_data():
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    for package in ("eightbit.quant.cuda", "eightbit.functional.cuda"):
        assert f'"{package}" = ["*.cu", "*.cuh"]' in pyproject
    for folder in (quant_cuda.KERNEL_DIR, optim_cuda.KERNEL_DIR):
        assert list(folder.glob("*.cu")) and list(folder.glob("*.cuh"))


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_load_source_inlines_headers_once(source):
    text = _runtime.load_source(source)
    assert '#include "' not in text
    assert text.count("struct Codebook {") == 1  # eightbit_quant.cuh, included by every kernel
    assert "#include <cuda_bf16.h>" in text


def test_missing_header_is_reported(tmp_path):
    (tmp_path / "k.cu").write_text('#include "nowhere.cuh"\n')
    with pytest.raises(FileNotFoundError, match="nowhere.cuh"):
        _runtime.load_source(tmp_path / "k.cu")


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_signatures_parse_to_known_c_types(source):
    kernels = _runtime.parse_kernels(_runtime.load_source(source))
    assert kernels
    for name, sig in kernels.items():
        assert sig.templates in (("T",), ("T", "G")), name
        for param in sig.params:
            if param.is_pointer:
                pointee = param.ctype[:-1]
                assert pointee in sig.templates or pointee in _runtime._POINTEE_DTYPES, param
            else:
                assert param.ctype in NUMPY_OF_CTYPE, param


def test_parse_reads_qualifiers_and_pointers():
    src = (
        "template <typename T, typename G>\n__global__ void __launch_bounds__(512) k(const T* "
        "__restrict__ x, unsigned char* c, long long n, double a, const long long* t) {}"
    )
    sig = _runtime.parse_kernels(src)["k"]
    assert sig.templates == ("T", "G")
    assert [(p.ctype, p.name) for p in sig.params] == [
        ("T*", "x"),
        ("unsigned char*", "c"),
        ("long long", "n"),
        ("double", "a"),
        ("long long*", "t"),
    ]


def test_instantiations():
    one = _runtime.Signature(("T",), ())
    two = _runtime.Signature(("T", "G"), ())
    assert _runtime.instantiations(one) == [(torch.float32,), (torch.float16,), (torch.bfloat16,)]
    assert set(_runtime.instantiations(two)) == {
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
    }
    names = _runtime.name_expressions(quant_cuda.KERNEL_DIR / "blockwise.cu")
    assert "eightbit::quantize_blockwise_kernel<__nv_bfloat16>" in names and len(names) == 6


# ------------------------------------------------------------------------- argument conversion


@pytest.mark.parametrize(
    "ctype, value, kind",
    [
        ("long long", 2**40, np.int64),
        ("int", 7, np.int32),
        ("unsigned long long", 2**63, np.uint64),
        ("float", 1e-3, np.float32),
        ("double", 0.999, np.float64),
    ],
)
def test_c_scalar_types_are_exact(ctype, value, kind):
    packed = _runtime.c_scalar(ctype, value)
    assert type(packed) is kind and packed == kind(value)


def test_c_scalar_refuses_overflow_and_wrong_kinds():
    with pytest.raises(OverflowError, match="int"):
        _runtime.c_scalar("int", 2**31)
    with pytest.raises(TypeError, match="needs an int"):
        _runtime.c_scalar("long long", 1.5)
    with pytest.raises(TypeError, match="needs an int"):
        _runtime.c_scalar("int", True)


def test_check_tensor_errors_name_the_problem():
    cpu = torch.device("cpu")
    with pytest.raises(TypeError, match="must be torch.float32.*got torch.float16"):
        _runtime.check_tensor(torch.ones(4, dtype=torch.float16), torch.float32, cpu, "x")
    with pytest.raises(ValueError, match=r"contiguous; pass x.contiguous\(\)"):
        _runtime.check_tensor(torch.ones(4, 4).t(), torch.float32, cpu, "x")
    with pytest.raises(ValueError, match=r"on cpu but the kernel runs on cuda:0.*\.to\('cuda:0'\)"):
        _runtime.check_tensor(torch.ones(4), torch.float32, torch.device("cuda", 0), "x")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        _runtime.check_tensor(np.ones(4), torch.float32, cpu, "x")


class Recorder:
    """Stands in for a compiled kernel on the CPU: packs arguments like Kernel.launch does."""

    def __init__(self, launches, path, name, dtypes, device):
        signature = _runtime.parse_kernels(_runtime.load_source(path))[name]
        self.kernel = _runtime.Kernel(name, signature, tuple(dtypes), torch.device("cpu"), None)
        self.launches = launches

    def launch(self, *args, grid, block, shared_mem=0):
        self.launches.append((self.kernel, self.kernel.pack(args), args, grid, block))


@pytest.fixture
def recorded(monkeypatch):
    """Run the typed launchers on CPU tensors, recording what would be launched."""
    launches = []
    monkeypatch.setattr(_runtime, "to_cupy", lambda t: t)
    for module in (quant_cuda, _launch):
        monkeypatch.setattr(module, "cuda_device", lambda t: torch.device("cpu"))
        monkeypatch.setattr(module, "grid_for", lambda tiles, block, device: min(tiles, 1000))
        monkeypatch.setattr(module, "get_kernel", lambda *a: Recorder(launches, *a))
    monkeypatch.setattr(_launch, "plans", _launch._Plans())
    return launches


def assert_exact_c_types(kernel, packed, args):
    for param, value, raw in zip(kernel.signature.params, packed, args, strict=True):
        if param.is_pointer:
            assert value is raw or (raw is None and type(value) is np.uint64 and value == 0)
        else:
            assert type(value) is NUMPY_OF_CTYPE[param.ctype], (param, type(value))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [64, 4096])
def test_quantize_launchers_pass_the_c_signature(recorded, dtype, block_size):
    n = 5000
    x, codebook = torch.randn(n).to(dtype), get_codebook()
    codes = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty(num_blocks(n, block_size))
    quant_cuda.quantize(x, codes, absmax, codebook, block_size)
    quant_cuda.dequantize(codes, absmax, codebook, block_size, torch.empty(n, dtype=dtype))
    (qk, qpacked, qargs, grid, block), (dk, dpacked, dargs, _, _) = recorded
    assert qk.name == "quantize_blockwise_kernel" and qk.dtypes == (dtype,)
    assert dk.name == "dequantize_blockwise_kernel" and dk.dtypes == (dtype,)
    assert_exact_c_types(qk, qpacked, qargs)
    assert_exact_c_types(dk, dpacked, dargs)
    assert (qpacked[4], qpacked[5]) == (n, block_size)
    assert block == max(256, block_size // 8) and block % (block_size // 8) == 0
    assert grid == -(-n // (block * 8))


def test_launch_checks_dtypes_against_the_signature(recorded):
    with pytest.raises(TypeError, match="argument 'absmax' must be torch.float32"):
        quant_cuda.quantize(
            torch.randn(64),
            torch.empty(64, dtype=torch.uint8),
            torch.empty(1, dtype=torch.float64),
            get_codebook(),
            64,
        )


def quantized(codes, absmax):
    """8-bit state lists as the public rules hand them to the CUDA kernels."""
    return [Quantized(c, a, None, None, False) for c, a in zip(codes, absmax, strict=True)]


def _adam_state(params, block_size):
    codes = [torch.full(p.shape, 127, dtype=torch.uint8) for p in params]
    absmax = [torch.zeros(num_blocks(p.numel(), block_size)) for p in params]
    return codes, absmax


def test_optimizer_launcher_builds_one_multi_tensor_table(recorded):
    block_size = 256
    sizes = [5000, 0, 3, 70000]
    params = [torch.randn(n) for n in sizes]
    grads = [torch.randn(n) for n in sizes]
    m, am = _adam_state(params, block_size)
    v, av = _adam_state(params, block_size)
    steps = [torch.tensor(3.0) for _ in params]
    optim_cuda.ADAM(
        params,
        grads,
        quantized(m, am),
        quantized(v, av),
        [None] * len(params),
        steps,
        lr=1e-3,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.01,
        decoupled_weight_decay=True,
        maximize=False,
        block_size=block_size,
    )
    ((kernel, packed, args, grid, block),) = recorded  # one launch for all parameters
    assert kernel.name == "adam_kernel" and kernel.dtypes == (torch.float32, torch.float32)
    assert_exact_c_types(kernel, packed, args)
    table, num_tensors, num_tiles = args[0], args[1], args[2]
    tile = block * 8
    live = [i for i, n in enumerate(sizes) if n]  # the empty parameter is skipped
    assert num_tensors == len(live) and table.shape == (len(live) * _launch.FIELDS,)
    rows = table.view(len(live), _launch.FIELDS).tolist()
    first = 0
    for row, i in zip(rows, live, strict=True):
        assert row[:8] == [
            params[i].data_ptr(),
            grads[i].data_ptr(),
            m[i].data_ptr(),
            am[i].data_ptr(),
            v[i].data_ptr(),
            av[i].data_ptr(),
            0,
            0,
        ]
        assert row[8:11] == [steps[i].data_ptr(), sizes[i], first]
        first += -(-sizes[i] // tile)
    assert num_tiles == first
    names = [p.name for p in kernel.signature.params]
    hyper = dict(zip(names, packed, strict=True))
    assert hyper["lr_ptr"] == 0 and type(hyper["lr"]) is np.float64 and hyper["lr"] == 1e-3
    assert hyper["decoupled"] == 1 and hyper["amsgrad"] == 0 and hyper["seed"] == 0


KERNEL_CALLS = {  # every FusedKernel with its rule's hyperparameters (torch-path keywords)
    "ADAM": dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=True,
                 maximize=False),
    "RMSPROP": dict(alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9, maximize=False),
    "LION": dict(beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False),
    "SGD": dict(momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=True, maximize=True),
    "ADAGRAD": dict(lr_decay=0.01, weight_decay=0.0, eps=1e-10, maximize=False),
}


@pytest.mark.parametrize("name", KERNEL_CALLS)
def test_every_fused_kernel_passes_its_c_signature(recorded, name):
    """The spec's scalars fill the kernel's C parameters one for one, with their exact types."""
    kernel = getattr(optim_cuda, name)
    params, grads = [torch.randn(5000)], [torch.randn(5000)]
    states = [quantized(*_adam_state(params, 256)) for _ in range(kernel.num_states)]
    steps = [[torch.tensor(1.0)]] if kernel.steps else []
    kernel(params, grads, *states, *steps, lr=1e-3, block_size=256, **KERNEL_CALLS[name])
    ((k, packed, args, _, _),) = recorded
    assert k.name == f"{name.lower()}_kernel"
    assert_exact_c_types(k, packed, args)
    values = dict(zip([p.name for p in k.signature.params], packed, strict=True))
    for key, value in KERNEL_CALLS[name].items():
        if key in values:
            assert values[key] == value, key
    with pytest.raises(TypeError, match="keywords"):
        kernel(params, grads, *states, *steps, lr=1e-3, block_size=256, amsgrad=True,
               **KERNEL_CALLS[name])


def test_optimizer_launcher_groups_dtypes_and_upcasts_grads(recorded):
    block_size = 64
    params = [torch.randn(100, dtype=torch.bfloat16), torch.randn(100), torch.randn(100).half()]
    grads = [torch.randn(100, dtype=torch.bfloat16), torch.randn(100).half(), torch.randn(100)]
    codes, absmax = _adam_state(params, block_size)
    optim_cuda.LION(
        params,
        grads,
        quantized(codes, absmax),
        lr=1e-4,
        beta1=0.9,
        beta2=0.99,
        weight_decay=0.0,
        maximize=True,
        block_size=block_size,
        bf16_stochastic_rounding=True,
    )
    seen = {
        k.dtypes: dict(zip([p.name for p in k.signature.params], a, strict=True))
        for k, _, a, _, _ in recorded
    }
    assert set(seen) == {
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float32),  # a half gradient of an fp32 parameter: upcast, exact
        (torch.float16, torch.float32),
    }
    bf16 = seen[(torch.bfloat16, torch.bfloat16)]
    assert bf16["seed"].dtype == torch.int64 and bf16["maximize"] == 1
    assert seen[(torch.float32, torch.float32)]["seed"] is None  # stochastic rounding: bf16 only


def test_optimizer_tables_are_reused_while_the_tensors_are(recorded):
    params, grads = [torch.randn(300)], [torch.randn(300)]
    codes, absmax = _adam_state(params, 64)

    def step():
        optim_cuda.LION(
            params,
            grads,
            quantized(codes, absmax),
            lr=torch.tensor(1e-4),
            beta1=0.9,
            beta2=0.99,
            weight_decay=0.0,
            maximize=False,
            block_size=64,
        )

    step()
    step()
    grads[0] = torch.randn(300)  # a new gradient tensor: a new table
    step()
    tables = [args[0] for _, _, args, _, _ in recorded]
    assert tables[0] is tables[1] and tables[2] is not tables[1]
    assert tables[2][1].item() == grads[0].data_ptr()


@pytest.mark.parametrize(
    "key, bad, error",
    [
        ("codes", torch.empty(100, dtype=torch.int8), "must be torch.uint8"),
        ("codes", torch.empty(100, 2, dtype=torch.uint8)[:, 0], "contiguous"),
        ("absmax", torch.empty(5), "do not fit"),
        ("grads", torch.empty(11), "11 elements"),
    ],
)
def test_optimizer_launcher_checks_states(recorded, key, bad, error):
    state = {
        "params": torch.randn(100),
        "grads": torch.randn(100),
        "codes": torch.empty(100, dtype=torch.uint8),
        "absmax": torch.empty(2),
    }
    state[key] = bad
    with pytest.raises((TypeError, ValueError), match=error):
        optim_cuda.LION(
            [state["params"]],
            [state["grads"]],
            quantized([state["codes"]], [state["absmax"]]),
            lr=1e-4,
            beta1=0.9,
            beta2=0.99,
            weight_decay=0.0,
            maximize=False,
            block_size=64,
        )


def test_to_cupy_passes_bfloat16_as_int16_views(monkeypatch):
    seen = []
    fake = types.SimpleNamespace(from_dlpack=lambda t: seen.append(t) or t)
    monkeypatch.setattr(_runtime, "cupy", lambda: fake)
    x = torch.randn(10, dtype=torch.bfloat16, requires_grad=True)
    out = _runtime.to_cupy(x)
    assert out.dtype == torch.int16 and out.data_ptr() == x.data_ptr() and not out.requires_grad
    assert _runtime.to_cupy(torch.ones(3)).dtype == torch.float32


# ------------------------------------------------------------------------- compile caching


def test_modules_compile_once_per_source_dtypes_and_device(monkeypatch):
    built = []

    class FakeModule:
        def __init__(self, code, options, name_expressions):
            built.append((code, options, tuple(name_expressions)))

        def compile(self):
            pass

        def get_function(self, name):
            return name

    class Device:
        def __init__(self, index):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake = types.SimpleNamespace(RawModule=FakeModule, cuda=types.SimpleNamespace(Device=Device))
    monkeypatch.setattr(_runtime, "cupy", lambda: fake)
    monkeypatch.setattr(_runtime, "_modules", {})
    monkeypatch.setattr(_runtime, "_kernels", {})
    monkeypatch.setattr(_runtime, "compilations", __import__("collections").Counter())
    source = quant_cuda.KERNEL_DIR / "blockwise.cu"
    d0, d1 = torch.device("cuda", 0), torch.device("cuda", 1)
    for _ in range(3):
        for name in ("quantize_blockwise_kernel", "dequantize_blockwise_kernel"):
            kernel = _runtime.get_kernel(source, name, (torch.bfloat16,), d0)
            assert kernel.function == f"eightbit::{name}<__nv_bfloat16>"
    assert len(built) == 1 and sum(_runtime.compilations.values()) == 1
    code, options, expressions = built[0]
    assert options == _runtime.COMPILE_OPTIONS and "--prec-div=true" in options
    assert set(expressions) == {
        "eightbit::quantize_blockwise_kernel<__nv_bfloat16>",
        "eightbit::dequantize_blockwise_kernel<__nv_bfloat16>",
    }
    assert code == _runtime.load_source(source)
    _runtime.get_kernel(source, "quantize_blockwise_kernel", (torch.float16,), d0)
    _runtime.get_kernel(source, "quantize_blockwise_kernel", (torch.bfloat16,), d1)
    assert len(built) == 3
    with pytest.raises(TypeError, match="not built for"):
        _runtime.get_kernel(source, "quantize_blockwise_kernel", (torch.int32,), d0)
    with pytest.raises(KeyError, match="no kernel template"):
        _runtime.get_kernel(source, "nope", (torch.float32,), d0)


def test_temporary_copies_are_written_back_and_never_cached(recorded):
    base = torch.randn(300, 64)
    param = base.t()  # non-contiguous: updated in a contiguous copy, then copied back
    grads = [torch.randn(64, 300).half()]  # an fp16 gradient of an fp32 parameter: upcast
    codes, absmax = _adam_state([param], 64)

    def step():
        optim_cuda.LION(
            [param],
            grads,
            quantized(codes, absmax),
            lr=1e-4,
            beta1=0.9,
            beta2=0.99,
            weight_decay=0.0,
            maximize=False,
            block_size=64,
        )

    step()
    step()
    (k1, _, a1, _, _), (k2, _, a2, _, _) = recorded
    assert k1.dtypes == (torch.float32, torch.float32)
    assert a1[0] is not a2[0]  # rebuilt: the copies of the first call are gone
    row = a1[0].tolist()
    assert row[0] != param.data_ptr() and row[1] != grads[0].data_ptr()
    assert not _launch.plans._lru  # nothing kept


def test_fp32_state_twins_launch_the_same_kernels_on_float_states(recorded):
    params = [torch.randn(5000), torch.randn(3)]
    grads = [torch.randn_like(p) for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(2.0) for _ in params]
    optim_cuda.ADAM(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [None] * len(params),
        steps,
        lr=1e-3,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        decoupled_weight_decay=False,
        maximize=False,
        block_size=1,  # the fp32 twins' chunk block; the kernel tiles fp32 state by 256
    )
    ((kernel, packed, args, _, _),) = recorded
    assert kernel.name == "adam_kernel"
    assert_exact_c_types(kernel, packed, args)
    hyper = dict(zip([p.name for p in kernel.signature.params], packed, strict=True))
    assert hyper["state_bits"] == 32 and hyper["block_size"] == 256
    rows = args[0].view(2, _launch.FIELDS).tolist()
    for row, m, v in zip(rows, exp_avgs, exp_avg_sqs, strict=True):
        assert row[2:8] == [m.data_ptr(), 0, v.data_ptr(), 0, 0, 0]
    with pytest.raises(TypeError, match="an fp32 state.*must be torch.float32"):
        optim_cuda.LION(
            params,
            grads,
            [torch.zeros(5000, dtype=torch.uint8), torch.zeros(3)],
            lr=1e-4,
            beta1=0.9,
            beta2=0.99,
            weight_decay=0.0,
            maximize=False,
            block_size=1,
        )
