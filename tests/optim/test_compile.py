"""torch.compile of a training step that calls optimizer.step(): the step is a clean graph break
(``torch.compiler.disable``), so the compiled step trains exactly like the eager one."""

import time

import pytest
import torch
from eightbit.optim import Adam8bit, AdamW8bit, Lion8bit, RMSprop8bit

# A tiny model compiles in seconds; minutes would mean dynamo is tracing into the optimizer.
COMPILE_BUDGET_S = 60


def make(cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64))
    return model, cls(model.parameters(), lr=1e-2, min_8bit_size=1024, block_size=64)


def train_step(model, opt, x):
    loss = torch.nn.functional.mse_loss(model(x), x.flip(-1))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


# dynamo's graph capture for every frontend; inductor (seconds of C++ compile) for one
CASES = [(cls, "eager") for cls in (Adam8bit, AdamW8bit, RMSprop8bit, Lion8bit)]
CASES.append((AdamW8bit, "inductor"))


@pytest.mark.parametrize("cls, backend", CASES, ids=lambda c: getattr(c, "__name__", c))
def test_a_compiled_step_trains_exactly_like_eager(cls, backend):
    batches = [torch.randn(8, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    eager_model, eager_opt = make(cls)
    for x in batches:
        train_step(eager_model, eager_opt, x)
    model, opt = make(cls)
    compiled = torch.compile(train_step, backend=backend)
    start = time.perf_counter()
    for x in batches:
        compiled(model, opt, x)
    assert time.perf_counter() - start < COMPILE_BUDGET_S
    assert opt.state[model[0].weight]["exp_avg_codes" if cls is not RMSprop8bit
                                      else "square_avg_codes"].dtype == torch.uint8
    for ours, theirs in zip(model.parameters(), eager_model.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_fullgraph_names_the_way_out():
    model, opt = make(AdamW8bit)
    model(torch.randn(4, 64)).sum().backward()
    with pytest.raises(Exception, match="call optimizer.step\\(\\) outside the compiled"):
        torch.compile(lambda: opt.step(), fullgraph=True)()
