"""A training killed after an epoch and resumed from last.ckpt equals the uninterrupted run for
the same seed (issue 15): the shuffle is a function of (seed, epoch) and the training noise's RNG
state travels in the checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.train import train

TINY = (
    "data=gaussian",
    "model=mlp_dsm",  # DSM: random t and z every step, so the RNG state matters
    "data.n_train=96",
    "data.n_val=16",
    "data.batch_size=16",  # 6 shuffled batches per epoch
    "model.net.hidden=16",
    "logger=none",
    "trainer.accelerator=cpu",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "trainer.max_epochs=2",  # also the cosine schedule's length: the same in all three runs
)


def _train(compose, out: Path, *overrides: str) -> dict:
    _, objects = train(compose("train", *TINY, f"paths.output_dir={out}", *overrides, bare=True))
    return {k: v.detach().clone() for k, v in objects["model"].state_dict().items()}


def test_resumed_training_equals_the_uninterrupted_run(tmp_path, compose):
    straight = _train(compose, tmp_path / "straight")
    # "Killed" after its first epoch (6 steps): its last.ckpt is what is left of it.
    _train(compose, tmp_path / "killed", "+trainer.max_steps=6")
    resumed = _train(
        compose, tmp_path / "resumed", f"ckpt_path={tmp_path / 'killed/checkpoints/last.ckpt'}"
    )
    assert straight.keys() == resumed.keys()
    for name, value in straight.items():  # the raw and the EMA weights, bit for bit
        assert torch.equal(value, resumed[name]), name
    # and the two epochs differ from one (the comparison could fail)
    one = torch.load(tmp_path / "killed/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert not all(torch.equal(one[k], straight[k]) for k in straight)
