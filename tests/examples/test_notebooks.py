"""The notebooks in examples/ run top to bottom in a fresh kernel, and are committed with outputs.

Each notebook is executed by nbclient in a new IPython kernel started from *this* interpreter
(``sys.executable``, i.e. ``.venv/bin/python`` under ``make test``), through a kernelspec written to
a temporary folder, so a ``python3`` kernelspec installed elsewhere on the machine can never be
picked instead. Plots use matplotlib's Agg backend. A cell that raises fails the test with the
cell's traceback.

To re-execute the notebooks and save their outputs (inline PNG plots) in place::

    .venv/bin/python tests/examples/test_notebooks.py [examples/02_quantization.ipynb ...]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_quantization.ipynb", "03_optimizers.ipynb"]
# A hang guard per cell, not a performance check: each notebook takes about a minute on 2 CPU cores.
CELL_TIMEOUT_S = 600
# The README promises notebooks that load quickly on GitHub: modest embedded PNGs, a few hundred
# KB for the three together.
MAX_NOTEBOOK_BYTES = 300_000


def _kernel_manager(folder: Path) -> KernelManager:
    """A manager for a ``python3`` kernel that runs ``sys.executable -m ipykernel_launcher``.

    Its kernelspec and connection file live in ``folder``, so nothing depends on (or is written
    to) the user's Jupyter directories.
    """
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3 (eightbit tests)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    specs = KernelSpecManager(kernel_dirs=[str(spec.parent)], ensure_native_kernel=False)
    return KernelManager(
        kernel_name="python3",
        kernel_spec_manager=specs,
        connection_file=str(folder / "connection.json"),
    )


def execute(
    nb: nbformat.NotebookNode, *, workdir: Path, inline_plots: bool
) -> nbformat.NotebookNode:
    """Run ``nb`` in place in a fresh kernel with working directory ``workdir``; return it."""
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ)
        # A fresh kernel: no IPython profile or startup scripts of the user's; Agg unless the
        # outputs are being saved (then matplotlib-inline embeds the PNGs).
        env["IPYTHONDIR"] = os.path.join(folder, "ipython")
        env.pop("MPLBACKEND", None)
        if not inline_plots:
            env["MPLBACKEND"] = "Agg"
        client = NotebookClient(
            nb,
            km=_kernel_manager(Path(folder)),
            kernel_name="python3",
            timeout=CELL_TIMEOUT_S,
            record_timing=False,
            resources={"metadata": {"path": str(workdir)}},
        )
        client.execute(env=env)
    return nb


def test_all_notebooks_are_collected():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


def test_kernel_runs_this_interpreter_with_agg(tmp_path):
    probe = "import sys, matplotlib; print(sys.executable, matplotlib.get_backend().lower())"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(probe)])
    execute(nb, workdir=tmp_path, inline_plots=False)
    assert nb.cells[0].outputs[0].text.split() == [sys.executable, "agg"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    nb = execute(nbformat.read(path, as_version=4), workdir=tmp_path, inline_plots=False)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    assert not list(tmp_path.iterdir()), "the notebook left files in its working directory"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown", "a notebook opens with a paragraph on what it shows"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name} is not executed top to bottom in one run; re-run it with "
        "`.venv/bin/python tests/examples/test_notebooks.py`"
    )
    outputs = [out for cell in code for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert any("image/png" in out.get("data", {}) for out in outputs), "plots are missing"
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES


def _update(paths: list[Path]) -> None:
    for path in paths:
        start = time.perf_counter()
        nb = execute(nbformat.read(path, as_version=4), workdir=EXAMPLES, inline_plots=True)
        nbformat.write(nb, path)
        size = path.stat().st_size
        print(f"{path.name}: {time.perf_counter() - start:.1f} s, {size / 1000:.0f} KB")


if __name__ == "__main__":
    _update([Path(arg).resolve() for arg in sys.argv[1:]] or NOTEBOOKS)
