"""The README's Lightning recipe: ``configure_optimizers`` returns AdamW8bit; a run resumed
with ``trainer.fit(ckpt_path=...)`` continues bit for bit like an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from eightbit.optim import AdamW8bit

from .readme import run_recipe

pl = pytest.importorskip("pytorch_lightning")
pytestmark = [  # Lightning's, not ours: one data loader process is on purpose; torch deprecations
    pytest.mark.filterwarnings("ignore:The '\\w+' does not have many workers"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]

EPOCHS, RESUME_AFTER = 4, 2  # epochs of 4 batches


class Regression(pl.LightningModule):
    """The model and its loss; the optimizers come from subclasses."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 100), torch.nn.GELU(),
                                       torch.nn.Linear(100, 67), torch.nn.GELU(),
                                       torch.nn.Linear(67, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)


class Regressor(Regression):
    def configure_optimizers(self):
        # 100 x 16 and 67 x 100 weights in 8 bits (6700 is not a multiple of the block)
        return AdamW8bit(self.parameters(), lr=1e-2, block_size=64, min_8bit_size=1024)


def data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    y = torch.cat([x[:, :2].sin(), x[:, 2:4] * x[:, 4:6]], dim=1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def fit(model, epochs: int, ckpt_path=None):
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, data(), ckpt_path=ckpt_path)
    return trainer


def summed_loss(model) -> float:
    """The loss summed over the batches of an epoch."""
    with torch.no_grad():
        return sum(model.training_step(batch, i).item() for i, batch in enumerate(data()))


def test_lightning_trains_and_resumes_bit_for_bit(tmp_path):
    model = Regressor(seed=0)
    before = summed_loss(model)
    trainer = fit(model, EPOCHS)
    opt = trainer.optimizers[0]
    assert isinstance(opt, AdamW8bit)
    assert opt.state[model.net[2].weight]["exp_avg_codes"].dtype == torch.uint8
    assert summed_loss(model) < before

    interrupted = fit(Regressor(seed=0), RESUME_AFTER)
    interrupted.save_checkpoint(tmp_path / "interrupted.ckpt")
    resumed = Regressor(seed=1)
    fit(resumed, EPOCHS, ckpt_path=tmp_path / "interrupted.ckpt")
    whole = dict(model.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.equal(p, whole[name]), name


def test_the_readme_recipe_trains():
    class Readme(Regression, run_recipe("lightning", {})["Model"]):
        """This file's model with the README's configure_optimizers."""

    model = Readme(seed=0)
    before = summed_loss(model)
    assert isinstance(fit(model, EPOCHS).optimizers[0], AdamW8bit)
    assert summed_loss(model) < before
