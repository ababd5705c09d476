"""The README's Hugging Face recipes: ``Trainer(optimizers=(opt, None))`` and
``Trainer(optimizer_cls_and_kwargs=(AdamW8bit, {...}))`` on a tiny GPT-2 built from a config
(nothing downloaded), trained a few steps on generated token sequences."""

from __future__ import annotations

import math

import pytest
import torch
from eightbit.optim import AdamW8bit

from .readme import run_recipe

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

VOCAB, LENGTH = 64, 16
STEPS, SAVE_AT = 8, 3  # the checkpoint falls inside the first epoch (4 batches of 8)
# Trainer's own learning_rate and weight_decay; the recipes' lr differs from it on purpose.
ARGS = dict(learning_rate=5e-5, weight_decay=0.1)
OPTIONS = dict(lr=1e-2, betas=(0.9, 0.95), block_size=128, min_8bit_size=1024)
OWN_DECAY = 0.5  # a weight_decay in the kwargs, which Trainer's groups override


@pytest.fixture(autouse=True, scope="module")
def quiet():
    """No progress bars (checkpoint writing has its own, which disable_tqdm leaves on)."""
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    yield
    if was_enabled:
        transformers.utils.logging.enable_progress_bar()


class Sequences(torch.utils.data.Dataset):
    """Arithmetic progressions modulo the vocabulary: learnable from the first two tokens."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 8, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(seed: int):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def training_args(out, **options):
    return transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS, logging_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, seed=0, **ARGS, **options)


def make_trainer(recipe: str, out, seed: int = 0):
    model = tiny_gpt2(seed)
    args = training_args(out, save_strategy="steps", save_steps=SAVE_AT)
    if recipe == "optimizers":  # the user builds the optimizer; Trainer adds its scheduler
        opt = AdamW8bit(model.parameters(), weight_decay=OWN_DECAY, **OPTIONS)
        return transformers.Trainer(model=model, args=args, train_dataset=Sequences(),
                                    optimizers=(opt, None))
    return transformers.Trainer(model=model, args=args, train_dataset=Sequences(),
                                optimizer_cls_and_kwargs=(AdamW8bit,
                                                          OPTIONS | {"weight_decay": OWN_DECAY}))


def mean_loss(model) -> float:
    model.eval()
    with torch.no_grad():
        ids = Sequences().ids
        return model(input_ids=ids, labels=ids).loss.item()


RECIPES = ["optimizers", "optimizer_cls_and_kwargs"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_trainer_trains_and_resumes_bit_for_bit(recipe, tmp_path):
    trainer = make_trainer(recipe, tmp_path / "whole")
    before = mean_loss(trainer.model)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, AdamW8bit)  # accelerate wraps it
    # Trainer's schedule scales the optimizer's lr, never TrainingArguments' learning_rate
    assert set(trainer.lr_scheduler.base_lrs) == {OPTIONS["lr"]}
    assert trainer.optimizer.state[trainer.model.transformer.wte.weight][
        "exp_avg_codes"].dtype == torch.uint8
    assert mean_loss(trainer.model) < before

    resumed = make_trainer(recipe, tmp_path / "resumed", seed=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / f"checkpoint-{SAVE_AT}"))
    whole = dict(trainer.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, whole[name]), name


def test_trainer_builds_the_optimizer_with_its_groups_and_the_given_options(tmp_path):
    trainer = make_trainer("optimizer_cls_and_kwargs", tmp_path)
    opt = trainer.create_optimizer()
    names = {p: n for n, p in trainer.model.named_parameters()}
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == ARGS["weight_decay"] and no_decay["weight_decay"] == 0.0
    assert all("bias" in names[p] or ".ln_" in names[p] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    for group in opt.param_groups:  # the lr comes from the kwargs, not TrainingArguments
        assert {k: group[k] for k in OPTIONS} == OPTIONS

    # One step on zero gradients: AdamW's update is 0, so only the decoupled decay moves the
    # parameters, by 1 - lr * weight_decay in the decay group and not at all in the other.
    before = {p: p.detach().clone() for p in names}
    for p in names:
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = 1 - OPTIONS["lr"] * ARGS["weight_decay"]
    for p in decay["params"]:
        assert torch.equal(p, before[p] * decayed), names[p]
    for p in no_decay["params"]:
        assert torch.equal(p, before[p]), names[p]
    for p in names:  # blocks of the given block_size; fp32 state below min_8bit_size
        state = opt.state[p]
        if p.numel() >= OPTIONS["min_8bit_size"]:
            assert state["exp_avg_absmax"].numel() == math.ceil(p.numel() / OPTIONS["block_size"])
        else:
            assert state["exp_avg"].dtype == torch.float32


def test_the_readme_recipes_train(tmp_path):
    names = {"args": training_args(tmp_path, save_strategy="no"), "train_dataset": Sequences()}
    for recipe in ("hf-optimizer-cls", "hf-optimizers"):  # the second uses the first's imports
        names["model"] = tiny_gpt2(seed=0)
        trainer = run_recipe(recipe, names)["trainer"]
        before = mean_loss(trainer.model)
        trainer.train()
        assert isinstance(trainer.optimizer.optimizer, AdamW8bit)
        assert mean_loss(trainer.model) < before, recipe
