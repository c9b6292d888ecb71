"""Faults survived: a NaN/inf loss stops the run naming the step (or is skipped with --skip_nan_steps), and the
weights and checkpoints on disk are never poisoned by it."""

import json
import os

import pytest
import torch
from conftest import train_argv
from safetensors.torch import load_file

import train_dreambooth


@pytest.fixture
def nan_at(monkeypatch):
    """Make the loss NaN at the given (1-based) steps: one masked_mse call per step (batch from one dataset,
    no accumulation, no prior)."""
    def install(*steps):
        real = train_dreambooth.masked_mse
        calls = {"n": 0}

        def poisoned(pred, target, mask=None, normalize=True):
            calls["n"] += 1
            loss = real(pred, target, mask, normalize)
            return loss * float("nan") if calls["n"] in steps else loss
        monkeypatch.setattr(train_dreambooth, "masked_mse", poisoned)
    return install


def trainable(folder):
    return load_file(os.path.join(folder, "trainable.safetensors"))


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tiny_model, subject_dir, tmp_path,
                                                                                nan_at):
    nan_at(3)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"loss became nan at step 3; stopping\. Last good checkpoint: .*checkpoint-2"):
        train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, out, "--checkpointing_steps", "1",
                                         "--max_train_steps", "5"))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    assert all(torch.isfinite(v).all() for v in trainable(out / "checkpoint-2").values())
    assert not os.path.exists(out / train_dreambooth.LORA_WEIGHTS_NAME)  # no final output from a failed run


def test_skip_nan_steps_drops_bad_batches_without_touching_the_weights(tiny_model, subject_dir, tmp_path, nan_at):
    nan_at(2, 4)
    out = tmp_path / "out"
    result = train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, out, "--checkpointing_steps", "1",
                                              "--max_train_steps", "6", "--skip_nan_steps", "2"))
    assert result["steps"] == 6
    before, after = trainable(out / "checkpoint-1"), trainable(out / "checkpoint-2")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the NaN batch applied nothing
    moved = trainable(out / "checkpoint-3")
    assert any(not torch.equal(after[k], moved[k]) for k in after)  # a good batch does
    final = load_file(str(out / train_dreambooth.LORA_WEIGHTS_NAME))
    assert all(torch.isfinite(v).all() for v in final.values())
    logged = [json.loads(line) for line in open(out / "logs" / "train_log.jsonl")]
    assert [r.get("skipped_nan_batches", 0) for r in logged] == [0, 1, 1, 2, 2, 2]


def test_one_nan_batch_more_than_allowed_stops_the_run(tiny_model, subject_dir, tmp_path, nan_at):
    nan_at(1, 2)
    with pytest.raises(SystemExit, match=r"at step 2; stopping \(1 bad batches skipped before\)"):
        train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--skip_nan_steps", "1"))
