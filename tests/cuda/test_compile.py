"""Every CUDA kernel source compiles, for every template instantiation, for sm_80 and sm_90,
without a single warning: by NVRTC (the run-time compiler, through CuPy's binding, with the
options CuPy uses at run time) and by nvcc (cubin, with ptxas' register and spill report).

No GPU is needed: this is the CI check that a kernel edit still builds."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from eightbit.functional.cuda import KERNEL_DIR as OPTIM_DIR
from eightbit.quant.cuda import KERNEL_DIR as QUANT_DIR
from eightbit.quant.cuda import _runtime

SOURCES = sorted(QUANT_DIR.glob("*.cu")) + sorted(OPTIM_DIR.glob("*.cu"))
ARCHS = ("80", "90")
# ptxas may trade a word or two of L1-resident spill for occupancy (it does for Lion at 64
# registers); more than this means the kernel outgrew its registers.
MAX_SPILL_BYTES = 32
CASES = [pytest.param(src, arch, id=f"{src.name}-sm{arch}") for src in SOURCES for arch in ARCHS]


def test_sources_found():
    assert {s.name for s in SOURCES} == {
        "blockwise.cu", "adam.cu", "rmsprop.cu", "lion.cu", "sgd.cu", "adagrad.cu"
    }
    for src in SOURCES:
        assert _runtime.name_expressions(src), f"{src.name} declares no kernel template"


def _nvrtc():
    try:
        from cupy._core import core
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as error:  # no CuPy, or CuPy without a loadable NVRTC library
        pytest.skip(f"NVRTC is not available through CuPy: {error}")
    return nvrtc, core


@pytest.mark.parametrize("source, arch", CASES)
def test_nvrtc_compiles_without_warnings(source, arch):
    nvrtc, core = _nvrtc()
    expressions = _runtime.name_expressions(source)
    # The options RawModule compiles with at run time (CuPy's include paths and C++ standard,
    # eightbit's options, then the -ftz=true CuPy appends), for a virtual architecture (no
    # driver needed).
    options = [
        *core.assemble_cupy_compiler_options(_runtime.COMPILE_OPTIONS),
        *_runtime.CUPY_APPENDED_OPTIONS,
        f"-arch=compute_{arch}",
    ]
    program = nvrtc.createProgram(_runtime.load_source(source), source.name, [], [])
    try:
        for expression in expressions:
            nvrtc.addNameExpression(program, expression)
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError:
            pytest.fail(f"NVRTC failed on {source.name}:\n{nvrtc.getProgramLog(program)}")
        log = nvrtc.getProgramLog(program).strip("\x00").strip()
        assert log == "", f"NVRTC warnings for {source.name}:\n{log}"
        for expression in expressions:
            assert nvrtc.getLoweredName(program, expression).startswith("_ZN8eightbit")
        ptx = nvrtc.getPTX(program).decode(errors="replace")
        assert ".entry" in ptx
        if source.name == "blockwise.cu":
            # bit-exact quantization: no instruction may flush subnormals, although CuPy
            # compiles with -ftz=true
            assert ".ftz" not in ptx, [line for line in ptx.splitlines() if ".ftz" in line][:5]
    finally:
        nvrtc.destroyProgram(program)


def _instantiating_source(source: Path) -> str:
    """The source (headers inlined) plus a table of kernel addresses, which makes nvcc emit
    every instantiation that NVRTC gets as name expressions."""
    addresses = ",\n".join(f"    (void*)&{e}" for e in _runtime.name_expressions(source))
    return f"{_runtime.load_source(source)}\nvoid* eightbit_instances[] = {{\n{addresses}}};\n"


@pytest.mark.slow
@pytest.mark.parametrize("source, arch", CASES)
def test_nvcc_compiles_without_warnings_or_spills(source, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    unit = tmp_path / source.name
    unit.write_text(_instantiating_source(source))
    result = subprocess.run(
        [
            nvcc,
            "-std=c++17",
            f"-arch=sm_{arch}",
            "-cubin",
            "-Xptxas",
            "-v",
            "-Werror",
            "all-warnings",
            "-ftz=true",
            "-prec-div=true",
            "-prec-sqrt=true",
            "-o",
            str(tmp_path / "out.cubin"),
            str(unit),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{report}"
    kernels = report.count("Compiling entry function")
    assert kernels == len(_runtime.name_expressions(source)), report
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    assert registers and max(registers) <= 128, report  # __launch_bounds__(512)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills, report
    assert all(int(a) + int(b) <= MAX_SPILL_BYTES for a, b in spills), f"spills:\n{report}"
    warnings = [line for line in report.splitlines() if "warning" in line.lower()]
    assert not warnings, report
