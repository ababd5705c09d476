"""The README's optimizer sections stay true: the swap runs, the memory table is measured."""

import re
from pathlib import Path

import pytest
import torch
from eightbit.optim import Adagrad8bit, Adam8bit, AdamW8bit, Lion8bit, RMSprop8bit, SGD8bit

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_the_one_line_swap_runs_as_written():
    code = re.search(r"```python\n(.*?)```", section("## One line changes"), re.S).group(1)
    assert "eightbit.optim.Adam8bit(model.parameters(), lr=1e-3)" in code
    x = torch.randn(8, 512)
    namespace = {"loader": [(x, torch.randn(8, 512))] * 3}
    exec(code, namespace)
    state = namespace["optimizer"].state[namespace["model"][0].weight]
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["step"].item() == 3


MEMORY_ROWS = {  # README row -> (our optimizer, its arguments, torch's bytes per parameter)
    "Adam / AdamW": (AdamW8bit, {}, 8),
    "Adam / AdamW, amsgrad": (Adam8bit, {"amsgrad": True}, 12),
    "RMSprop": (RMSprop8bit, {}, 4),
    "RMSprop, momentum + centered": (RMSprop8bit, {"momentum": 0.9, "centered": True}, 12),
    "Lion": (Lion8bit, {}, 4),
    "SGD, momentum": (SGD8bit, {"momentum": 0.9}, 4),
    "Adagrad": (Adagrad8bit, {}, 4),
}


@pytest.mark.parametrize("name", MEMORY_ROWS)
def test_memory_table_matches_measured_state(name):
    cls, kwargs, torch_bytes = MEMORY_ROWS[name]
    p = torch.zeros(1 << 16)
    opt = cls([p], **kwargs)
    p.grad = torch.ones_like(p)
    opt.step()
    state = {k: v for k, v in opt.state[p].items() if k != "step"}
    measured = sum(v.numel() * v.element_size() for v in state.values()) / p.numel()
    row = next(line for line in section("### Memory").splitlines()
               if line.startswith(f"| {name} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1].split()[0]) == torch_bytes
    assert float(cells[2].split()[0]) == pytest.approx(measured, abs=0.005)
    gib = [float(v.split()[0]) for v in cells[3].split("->")]
    assert gib == pytest.approx([torch_bytes * 1e9 / 2**30, measured * 1e9 / 2**30], abs=0.006)
