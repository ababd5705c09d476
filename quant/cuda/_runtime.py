"""The torch <-> CuPy boundary: the only module of eightbit that imports CuPy.

A kernel source is a ``.cu`` file shipped as package data. :func:`load_source` reads it and
inlines its quoted ``#include "..."`` headers (so CuPy's disk cache, keyed by the source text,
sees a header change). :func:`get_kernel` compiles every kernel template of the file for one
template argument list with NVRTC through ``cupy.RawModule(code=..., name_expressions=...)``,
once per process, device and template arguments, and returns a :class:`Kernel`.

:meth:`Kernel.launch` is the one place a kernel starts. It takes the arguments in the order of
the kernel's C signature (parsed from the source), checks every tensor before anything runs
(dtype against the C pointer type, device, contiguity), converts tensors by DLPack (zero copy)
and scalars to their exact C type (``numpy.int64`` for ``long long``, ``numpy.float32`` for
``float``, ...; CuPy would otherwise pass a Python int as 64 bits and a float as a double), and
launches on torch's current stream with an explicit ``grid=`` and ``block=``. No call here
synchronises the host, so launches are capturable in CUDA graphs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

CUPY_MISSING = (
    "eightbit runs CUDA tensors through CuPy, which is not installed: install the extra that "
    "matches your CUDA, `pip install 'eightbit[cuda12]'` (CUDA 12) or `pip install "
    "'eightbit[cuda13]'` (CUDA 13)"
)

# Headers are looked up next to the including file, then here (quant/cuda).
HEADER_DIR = Path(__file__).resolve().parent

# IEEE division and square root (NVRTC's defaults, spelled out). CuPy itself appends
# -ftz=true to every compilation (cupy/cuda/compiler.py), after these options, so flush-to-zero
# cannot be turned off here: the quantization arithmetic of eightbit_quant.cuh is written in PTX
# without .ftz and on bit patterns instead, so that it keeps subnormals whatever the flag.
COMPILE_OPTIONS = ("--prec-div=true", "--prec-sqrt=true", "--fmad=true")
CUPY_APPENDED_OPTIONS = ("-ftz=true",)

CTYPE_NAMES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}

# Number of NVRTC module builds per (source, template arguments, device index): a test checks
# that a second call does not compile again.
compilations: collections.Counter = collections.Counter()
_modules: dict[tuple[str, str, int], object] = {}  # (source, template args, device index)
_kernels: dict[tuple, Kernel] = {}  # (source, kernel, dtypes, device)


@functools.cache
def cupy():
    """Import CuPy on first CUDA use; raise ``ImportError`` naming the extra when it is missing."""
    try:
        import cupy as cp
    except ImportError as error:
        raise ImportError(CUPY_MISSING) from error
    return cp


def ctype_name(dtype: torch.dtype) -> str:
    """The C type of a dtype in the kernels' templates (``torch.bfloat16``: ``__nv_bfloat16``)."""
    try:
        return CTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(
            f"CUDA kernels take float32, float16 or bfloat16 data, got {dtype}"
        ) from None


# ------------------------------------------------------------------------------------- sources

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)


def load_source(path: str | Path) -> str:
    """The text of a ``.cu`` file with its quoted includes inlined (each header once)."""
    return _inline(Path(path).resolve(), set())


def _inline(path: Path, seen: set[Path]) -> str:
    if path in seen:
        return ""
    seen.add(path)
    text = path.read_text()

    def include(match: re.Match) -> str:
        for folder in (path.parent, HEADER_DIR):
            candidate = (folder / match.group(1)).resolve()
            if candidate.is_file():
                return _inline(candidate, seen)
        raise FileNotFoundError(
            f"{path.name} includes {match.group(1)!r}, found in neither "
            f"{path.parent} nor {HEADER_DIR}"
        )

    return _INCLUDE.sub(include, text.replace("#pragma once\n", ""))


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of a kernel's C signature: ``ctype`` without qualifiers, e.g. ``T*``."""

    ctype: str
    name: str

    @property
    def is_pointer(self) -> bool:
        return self.ctype.endswith("*")


@dataclasses.dataclass(frozen=True)
class Signature:
    """A kernel template: its template parameter names (data types) and C parameters."""

    templates: tuple[str, ...]
    params: tuple[Param, ...]


_KERNEL = re.compile(
    r"template\s*<([^>]*)>\s*__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?"
    r"(\w+)\s*\(([^)]*)\)"
)


def parse_kernels(source: str) -> dict[str, Signature]:
    """The kernel templates of a source (``template <typename T, ...> __global__ void``)."""
    kernels = {}
    for match in _KERNEL.finditer(source):
        templates, name, params = match.groups()
        templates = tuple(t.split()[-1] for t in templates.split(","))
        parsed = []
        for raw in params.split(","):
            words = raw.replace("*", " * ").split()
            words = [w for w in words if w not in ("const", "__restrict__")]
            ctype = " ".join(w for w in words[:-1] if w != "*")
            parsed.append(Param(ctype + "*" * words.count("*"), words[-1]))
        kernels[name] = Signature(templates, tuple(parsed))
    return kernels


def instantiations(signature: Signature) -> list[tuple[torch.dtype, ...]]:
    """The data types a kernel template is built for: the first template parameter (the
    parameter/data dtype) takes float32, float16 and bfloat16; a second one (the gradient dtype)
    is either the first one or float32 (launchers upcast any other gradient dtype to float32,
    which is exact)."""
    if len(signature.templates) == 1:
        return [(d,) for d in CTYPE_NAMES]
    if len(signature.templates) == 2:
        return [(d, d) for d in CTYPE_NAMES] + [
            (d, torch.float32) for d in CTYPE_NAMES if d != torch.float32
        ]
    raise ValueError(f"kernels take one or two data-type template parameters, got {signature}")


# ------------------------------------------------------------------------------ argument packing

_POINTEE_DTYPES = {
    "float": torch.float32,
    "unsigned char": torch.uint8,
    "long long": torch.int64,
    "int": torch.int32,
}
_SCALARS = {
    "long long": (np.int64, True),
    "int": (np.int32, True),
    "unsigned long long": (np.uint64, True),
    "float": (np.float32, False),
    "double": (np.float64, False),
}


def c_scalar(ctype: str, value) -> np.generic:
    """``value`` as the numpy scalar of C type ``ctype``; ``OverflowError`` if it does not fit."""
    try:
        kind, integral = _SCALARS[ctype]
    except KeyError:
        raise TypeError(f"no scalar conversion for C type {ctype!r}") from None
    if integral:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"a {ctype} argument needs an int, got {type(value).__name__}")
        info = np.iinfo(kind)
        if not info.min <= int(value) <= info.max:
            raise OverflowError(f"{value} does not fit the kernel's C type {ctype}")
        return kind(value)
    return kind(float(value))


def check_tensor(t: torch.Tensor, dtype: torch.dtype, device: torch.device, name: str) -> None:
    """Raise unless ``t`` is a contiguous tensor of ``dtype`` on ``device`` (the launch checks)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} for this kernel, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; pass {name}.contiguous()")
    if t.device != device:
        raise ValueError(
            f"{name} is on {t.device} but the kernel runs on {device}; "
            f"move it with .to({str(device)!r})"
        )


def to_cupy(t: torch.Tensor):
    """A CuPy view of a CUDA tensor by DLPack: zero copy, and no stream synchronisation when
    CuPy's current stream is torch's (as inside :meth:`Kernel.launch`). A kernel needs only the
    address, so bfloat16 crosses as int16 (CuPy before v14 has no bfloat16 dtype)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return cupy().from_dlpack(t)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A compiled kernel for one tuple of data types on one device, with its C signature."""

    name: str
    signature: Signature
    dtypes: tuple[torch.dtype, ...]
    device: torch.device
    function: object

    def pack(self, args: Sequence) -> list:
        """Check and convert ``args`` (in C order) to what CuPy passes as the exact C types."""
        params = self.signature.params
        if len(args) != len(params):
            raise TypeError(f"{self.name} takes {len(params)} arguments, got {len(args)}")
        templates = dict(zip(self.signature.templates, self.dtypes, strict=True))
        packed = []
        for param, value in zip(params, args, strict=True):
            if param.is_pointer:
                pointee = param.ctype[:-1]
                if value is None:  # an optional state: a null pointer
                    packed.append(np.uint64(0))
                    continue
                dtype = templates[pointee] if pointee in templates else _POINTEE_DTYPES[pointee]
                check_tensor(value, dtype, self.device, f"{self.name} argument {param.name!r}")
                packed.append(to_cupy(value))
            else:
                packed.append(c_scalar(param.ctype, value))
        return packed

    def launch(self, *args, grid: int, block: int, shared_mem: int = 0) -> None:
        """Launch on torch's current stream of the kernel's device, after checking all arguments."""
        if not (
            isinstance(grid, int) and isinstance(block, int) and grid > 0 and 0 < block <= 1024
        ):
            raise ValueError(f"bad launch shape grid={grid!r}, block={block!r}")
        cp = cupy()
        stream = torch.cuda.current_stream(self.device)
        with (
            cp.cuda.Device(self.device.index),
            _external_stream(stream.cuda_stream, self.device.index),
        ):
            self.function((grid,), (block,), tuple(self.pack(args)), shared_mem=shared_mem)


@functools.lru_cache(maxsize=64)
def _external_stream(pointer: int, device_index: int):
    return cupy().cuda.ExternalStream(pointer, device_index)


def cuda_device(t: torch.Tensor) -> torch.device:
    """The indexed CUDA device of a tensor, or ``ValueError`` for a tensor not on CUDA."""
    if t.device.type != "cuda":
        raise ValueError(f"the CUDA kernels need CUDA tensors, got a tensor on {t.device}")
    return torch.device(
        "cuda", t.device.index if t.device.index is not None else torch.cuda.current_device()
    )


def get_kernel(
    path: str | Path, name: str, dtypes: tuple[torch.dtype, ...], device: torch.device
) -> Kernel:
    """Kernel ``name`` of the source at ``path`` for the data types ``dtypes`` on ``device``.

    The first request for a (source, dtypes, device) compiles all kernels of the source with
    those template arguments in one NVRTC program (counted in :data:`compilations`); later
    requests reuse it (and the :class:`Kernel`, so that a launch costs no parsing). CuPy caches
    the binary on disk, so another process only loads it.
    """
    dtypes = tuple(dtypes)
    fast = (str(path), name, dtypes, device)
    kernel = _kernels.get(fast)
    if kernel is not None:
        return kernel
    path = Path(path).resolve()
    source = _sources(path)
    kernels = parse_kernels(source)
    if name not in kernels:
        raise KeyError(f"{path.name} has no kernel template {name!r} (it has {sorted(kernels)})")
    if dtypes not in instantiations(kernels[name]):
        raise TypeError(f"{name} is not built for data types {dtypes}")
    targs = ", ".join(ctype_name(d) for d in dtypes)
    key = (str(path), targs, device.index)
    module = _modules.get(key)
    if module is None:
        cp = cupy()
        expressions = [
            _expression(k, targs) for k, sig in kernels.items() if dtypes in instantiations(sig)
        ]
        with cp.cuda.Device(device.index):
            module = cp.RawModule(
                code=source, options=COMPILE_OPTIONS, name_expressions=expressions
            )
            module.compile()
        compilations[key] += 1
        _modules[key] = module
    with cupy().cuda.Device(device.index):
        function = module.get_function(_expression(name, targs))
    kernel = _kernels[fast] = Kernel(name, kernels[name], dtypes, device, function)
    return kernel


def name_expressions(path: str | Path) -> list[str]:
    """Every template instantiation of a source (what the compile test builds)."""
    kernels = parse_kernels(_sources(Path(path).resolve()))
    return [
        _expression(k, ", ".join(ctype_name(d) for d in dtypes))
        for k, sig in kernels.items()
        for dtypes in instantiations(sig)
    ]


def _expression(kernel: str, targs: str) -> str:
    return f"eightbit::{kernel}<{targs}>"


@functools.lru_cache(maxsize=32)
def _sources(path: Path) -> str:
    return load_source(path)


@functools.lru_cache(maxsize=16)
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def grid_for(tiles: int, block: int, device: torch.device) -> int:
    """Grid of a grid-stride kernel: four waves of resident CTAs (2048 threads per SM), at most
    one CTA per tile."""
    return max(1, min(tiles, 4 * multiprocessor_count(device.index) * max(1, 2048 // block)))
