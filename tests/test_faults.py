"""Faults survived: every script killed (SIGKILL) at points the test picks and run again ends with the outputs of an
uninterrupted run; a NaN/inf loss stops the run naming the step (or is skipped with --skip_nan_steps); a full disk
is a clear error that leaves the previous state intact."""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, train_argv
from safetensors.torch import load_file

from common import adapters, checkpoints, files
import train_dreambooth


@pytest.fixture
def nan_at(monkeypatch):
    """Make the loss NaN (or `value`, e.g. inf) at the given (1-based) steps: one masked_mse call per step (batch
    from one dataset, no accumulation, no prior)."""
    def install(*steps, value=float("nan")):  # (again for a second run: counts start afresh)
        real = getattr(train_dreambooth.masked_mse, "unpoisoned", train_dreambooth.masked_mse)
        calls = {"n": 0}

        def poisoned(pred, target, mask=None, normalize=True):
            calls["n"] += 1
            loss = real(pred, target, mask, normalize)
            return loss * value if calls["n"] in steps else loss
        poisoned.unpoisoned = real
        monkeypatch.setattr(train_dreambooth, "masked_mse", poisoned)
    return install


def trainable(folder):
    return load_file(os.path.join(folder, "trainable.safetensors"))


@pytest.mark.parametrize("family,bad", [("sd1", "nan"), ("sd1", "inf"), ("flux", "nan")])
def test_a_nan_or_inf_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tiny_model, subject_dir,
                                                                                       tmp_path, nan_at, family, bad):
    nan_at(3, value=float(bad))
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=rf"loss became {bad} at step 3; stopping\. Last good checkpoint: .*-2"):
        train_dreambooth.main(train_argv(tiny_model(family), subject_dir, out, "--checkpointing_steps", "1",
                                         "--max_train_steps", "5"))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    assert all(torch.isfinite(v).all() for v in trainable(out / "checkpoint-2").values())
    assert not os.path.exists(out / adapters.LORA_WEIGHTS_NAME)  # no final output from a failed run


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
    final = load_file(str(out / adapters.LORA_WEIGHTS_NAME))
    assert all(torch.isfinite(v).all() for v in final.values())
    logged = [json.loads(line) for line in open(out / "logs" / "train_log.jsonl")]
    assert [r.get("skipped_nan_batches", 0) for r in logged] == [0, 1, 1, 2, 2, 2]


def test_one_nan_batch_more_than_allowed_stops_the_run(tiny_model, subject_dir, tmp_path, nan_at):
    nan_at(1, 2)
    with pytest.raises(SystemExit, match=r"at step 2; stopping \(1 bad batches skipped before\)"):
        train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--skip_nan_steps", "1"))


def test_skipped_nan_batches_are_counted_across_a_resume(tiny_model, subject_dir, tmp_path, nan_at):
    """--skip_nan_steps is a budget for the whole run: a resumed run starts with the checkpoint's count."""
    out = tmp_path / "out"
    argv = train_argv(tiny_model("sd1"), subject_dir, out, "--checkpointing_steps", "2", "--max_train_steps", "4",
                      "--skip_nan_steps", "1")
    nan_at(1)  # step 1 is skipped, checkpoint-2 records it
    train_dreambooth.main(argv)
    assert json.load(open(out / "checkpoint-2" / checkpoints.STATE_FILE))["skipped_nan_batches"] == 1
    nan_at(1)  # the resumed run's first step (3) is bad too: the second of a budget of one
    with pytest.raises(SystemExit, match=r"at step 3; stopping \(1 bad batches skipped before\)"):
        train_dreambooth.main(argv + ["--resume_from_checkpoint", "latest"])


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL anywhere: each script is killed at points the test picks from a logged uninterrupted run (every place a
# finished temporary file waits to be renamed, training steps), then the same command runs again. Between the two,
# every file under its real name must be whole; after, every output must equal the uninterrupted run's.

def run_script(script, args, **env):
    """Run one of the project's scripts in a fresh interpreter; returns the CompletedProcess."""
    command = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    return subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, capture_output=True,
                          text=True, timeout=600)


def logged_points(script, args, tmp_path):
    log = tmp_path / "points.log"
    done = run_script(script, args, DREAMBOOTH_FAULT_LOG=str(log))
    assert done.returncode == 0, done.stderr[-3000:]
    return open(log).read().split()


def spread(points, name, count):
    """`count` arrivals at `name` spread over the run, first and last included: ["name:N", ...]."""
    total = points.count(name)
    picks = sorted({1 + round(i * (total - 1) / max(1, count - 1)) for i in range(count)})
    return [f"{name}:{n}" for n in picks]


def files_under(*folders):
    found = {}
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                found[os.path.relpath(path, os.path.dirname(folder))] = path
    return found


def assert_every_named_file_is_whole(*folders):
    """What a kill leaves: temporaries (never read: they lie in .tmpPID/ folders) and whole files under real names.
    The one file written in place is the log, and its readers drop a last line a kill cut short."""
    from PIL import Image

    for rel, path in files_under(*folders).items():
        if re.search(r"\.tmp\d*" + re.escape(os.sep), rel):
            continue
        if path.endswith(".safetensors"):
            load_file(path)
        elif path.endswith(".png"):
            Image.open(path).load()
        elif path.endswith(".json"):
            json.load(open(path))
        elif path.endswith(".pt"):
            torch.load(path, weights_only=True)
        elif path.endswith(".jsonl"):
            checkpoints.read_log(path)


def kill_and_rerun(script, args, kill, clean):
    clean()
    killed = run_script(script, args, DREAMBOOTH_KILL_AT=kill)
    assert killed.returncode == -signal.SIGKILL, (kill, killed.returncode, killed.stderr[-2000:])
    return killed


def rerun(script, args):
    done = run_script(script, args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def read_bytes(folder):
    return {rel: open(path, "rb").read() for rel, path in files_under(folder).items()}


def assert_killed_runs_end_byte_identical(script, args, folder, tmp_path, count):
    """Kill `script` at `count` write points spread over an uninterrupted run's, each time from scratch, and run it
    again: `folder` must then hold what the uninterrupted run wrote, byte for byte. Returns those files."""
    points = logged_points(script, args, tmp_path)
    expected = read_bytes(folder)
    for kill in spread(points, "write", count):
        kill_and_rerun(script, args, kill, lambda: shutil.rmtree(folder, ignore_errors=True))
        assert_every_named_file_is_whole(str(folder))
        rerun(script, args)
        assert read_bytes(folder) == expected, kill
    return expected


def test_cache_latents_killed_anywhere_rebuilds_byte_identical_caches(tiny_model, subject_dir, tmp_path):
    cache = tmp_path / "cache"
    args = ["--pretrained_model_name_or_path", tiny_model("sd1"), "--instance_data_dir", subject_dir,
            "--instance_prompt", "a photo of ohwx toy", "--output_dir", tmp_path / "out", "--cache_dir", cache,
            "--resolution", 64]
    expected = assert_killed_runs_end_byte_identical("cache_latents.py", args, cache, tmp_path, 3)
    assert sum(rel.endswith(".safetensors") for rel in expected) >= 9  # 8 latents + a caption's embeddings


def same_values(a, b):
    """Equal, tensors within 1e-6 (fp32 on CPU; a resumed run repeats the arithmetic of an uninterrupted one)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-6,
                                                                                    rtol=0)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return isinstance(b, (int, float)) and abs(a - b) <= 1e-6 * max(1.0, abs(a))
    return a == b


def assert_same_training_outputs(out, reference):
    """Everything a training run leaves equals the uninterrupted run's: the adapter files (tensors and metadata),
    every checkpoint (weights, optimiser, schedule, RNG, state file), the config and the log (but for step times)."""
    def contents(folder):  # TensorBoard's event files are named by time and host; they hold the log's numbers
        return {rel: path for rel, path in ((os.path.relpath(path, folder), path)
                                            for path in files_under(str(folder)).values())
                if not rel.startswith(os.path.join("logs", checkpoints.TRACKER_PROJECT))}
    got, want = contents(out), contents(reference)
    assert sorted(got) == sorted(want)
    for rel, path in want.items():
        if rel.endswith(".safetensors"):
            with files.safe_open(path, framework="pt") as a, files.safe_open(got[rel], framework="pt") as b:
                assert a.metadata() == b.metadata(), rel
            assert same_values(load_file(path), load_file(got[rel])), rel
        elif rel.endswith(".pt"):
            assert same_values(torch.load(path, weights_only=True), torch.load(got[rel], weights_only=True)), rel
        elif rel.endswith(".jsonl"):
            def untimed(log):
                return [{k: v for k, v in record.items() if k != "step_time"} for record in checkpoints.read_log(log)]
            assert same_values(untimed(path), untimed(got[rel])), rel
        elif rel.endswith(".json"):  # args.json records where the run wrote and what it resumed from
            def run(values):
                return {k: v for k, v in values.items() if k not in ("output_dir", "resume_from_checkpoint")}
            assert same_values(run(json.load(open(path))), run(json.load(open(got[rel])))), rel
        else:
            assert open(path, "rb").read() == open(got[rel], "rb").read(), rel


def start_when_ready(script, args, ready, stderr=subprocess.DEVNULL, **env):
    """Start `script` in a fresh interpreter and return its Popen once `ready()` holds (or it has ended)."""
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                               env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, stdout=subprocess.DEVNULL,
                               stderr=stderr, text=True)
    while not ready() and process.poll() is None:
        time.sleep(0.01)
    return process


def logged_run_with_timing(script, args, tmp_path, ready):
    """An uninterrupted run that logs its fault points; returns (points, seconds it ran after `ready()` held)."""
    log = tmp_path / "points.log"
    process = start_when_ready(script, args, ready, subprocess.PIPE, DREAMBOOTH_FAULT_LOG=str(log))
    since = time.monotonic()
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return open(log).read().split(), time.monotonic() - since


def kill_at_a_moment(script, args, ready, delay):
    """Start `script`, wait until `ready()`, then SIGKILL it `delay` seconds later, wherever it is."""
    process = start_when_ready(script, args, ready)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before the kill: choose an earlier moment"


def training_kill_setup(tiny_model, subject_dir, tmp_path, *extra):
    """A 6-step run with checkpoints every 2 steps, its caches built; returns (args, out, ready)."""
    out = tmp_path / "out"
    args = train_argv(tiny_model("sd1"), subject_dir, out, "--max_train_steps", "6", "--checkpointing_steps", "2",
                      "--cache_dir", tmp_path / "cache", "--resume_from_checkpoint", "latest", *extra)
    rerun("train_dreambooth.py", args)  # the caches first: every later run finds them, so its writes line up
    shutil.rmtree(out)
    return args, out, lambda: bool(checkpoints.read_log(str(out / "logs" / "train_log.jsonl")))  # a step is logged


def test_training_killed_in_a_step_a_checkpoint_write_or_the_final_save_ends_where_it_would_have(
        tiny_model, subject_dir, tmp_path):
    """Killed between a step's backward pass and its update, at a random moment, inside a checkpoint, during the
    final save: the rerun (--resume_from_checkpoint latest) leaves every file the uninterrupted run leaves, the
    weights, optimiser states, RNG states and log included."""
    args, out, ready = training_kill_setup(tiny_model, subject_dir, tmp_path)
    points, seconds = logged_run_with_timing("train_dreambooth.py", args, tmp_path, ready)
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    # Writes after the last step are the final save; the others belong to the log, caches and checkpoints.
    last_step = len(points) - points[::-1].index("step")
    final_writes = points[last_step:].count("write")
    total_writes = points.count("write")
    kills = ["backward:3", f"write:{total_writes - final_writes - 1}", f"write:{total_writes - final_writes + 1}",
             f"write:{total_writes}", *spread(points[:last_step], "write", 3)[1:2]]
    for kill in [*kills, "a random moment"]:
        if kill == "a random moment":  # wherever it lands: in a forward pass, a write, between two lines of code
            shutil.rmtree(out)
            kill_at_a_moment("train_dreambooth.py", args, ready, random.Random(0).uniform(0, 0.6) * seconds)
        else:
            kill_and_rerun("train_dreambooth.py", args, kill, lambda: shutil.rmtree(out, ignore_errors=True))
        assert_every_named_file_is_whole(str(out), str(tmp_path / "cache"))
        rerun("train_dreambooth.py", args)
        assert_same_training_outputs(out, reference)
        assert not [p for p in files_under(str(out)) if ".tmp" in p], kill


def test_a_full_fine_tune_killed_while_its_pipeline_is_moved_into_place_is_no_model_until_whole(
        tiny_model, subject_dir, tmp_path):
    """The final pipeline is moved into --output_dir part by part, model_index.json last: killed half-way, the
    folder is not a model (nothing loads a mix of parts); the rerun finishes it as the uninterrupted run did."""
    args, out, _ = training_kill_setup(tiny_model, subject_dir, tmp_path, "--model_type", "full",
                                       "--learning_rate", "1e-4")
    points = logged_points("train_dreambooth.py", args, tmp_path)
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    last_step = len(points) - points[::-1].index("step")
    moves, total_writes = points[last_step:].count("write"), points.count("write")
    assert moves >= 5  # unet, vae, text encoder, tokenizer, scheduler, ..., model_index.json
    kill_and_rerun("train_dreambooth.py", args, f"write:{total_writes - moves // 2}",
                   lambda: shutil.rmtree(out, ignore_errors=True))
    moved = [name for name in ("scheduler", "text_encoder", "tokenizer", "unet", "vae") if os.path.isdir(out / name)]
    assert moved and len(moved) < 5 and not os.path.exists(out / "model_index.json")  # half moved: not a model
    assert_every_named_file_is_whole(str(out))
    rerun("train_dreambooth.py", args)
    assert_same_training_outputs(out, reference)


def test_make_regularisation_killed_anywhere_ends_with_the_same_images(tiny_model, tmp_path):
    reg = tmp_path / "class"
    args = ["--pretrained_model_name_or_path", tiny_model("sd1"), "--class_prompt", "a photo of a toy",
            "--num_images", 6, "--batch_size", 2, "--output_dir", reg, "--resolution", 64,
            "--num_inference_steps", 2, "--device", "cpu", "--dtype", "fp32"]
    expected = assert_killed_runs_end_byte_identical("make_regularisation.py", args, reg, tmp_path, 3)
    assert sum(rel.endswith(".png") for rel in expected) == 6


def test_make_masks_killed_anywhere_ends_with_the_same_masks(tmp_path):
    import make_demo

    cutouts = tmp_path / "cutouts"
    make_demo.make_subject_images(str(tmp_path / "subject"), sizes=((64, 64),) * 4, cutouts=str(cutouts))
    masks = tmp_path / "masks"
    args = ["--input_dir", cutouts, "--output_dir", masks, "--method", "alpha", "--mask_blur", 2]
    expected = assert_killed_runs_end_byte_identical("make_masks.py", args, masks, tmp_path, 2)
    assert sum(rel.endswith(".png") for rel in expected) == 4


def test_resume_latest_skips_an_incomplete_checkpoint_folder(tiny_model, subject_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = train_argv(tiny_model("sd1"), subject_dir, out, "--max_train_steps", "4", "--checkpointing_steps", "2")
    expected = train_dreambooth.main(args)
    reference = load_file(str(out / adapters.LORA_WEIGHTS_NAME))
    # A later checkpoint folder that never got its state file (a partial copy, a foreign tool's folder).
    broken = out / "checkpoint-3"
    shutil.copytree(out / "checkpoint-2", broken)
    os.remove(broken / checkpoints.STATE_FILE)
    os.remove(out / adapters.LORA_WEIGHTS_NAME)
    result = train_dreambooth.main(args + ["--resume_from_checkpoint", "latest"])
    assert "checkpoint-3 is incomplete" in capsys.readouterr().out
    assert result["steps"] == expected["steps"] == 4
    resumed = load_file(str(out / adapters.LORA_WEIGHTS_NAME))
    assert all(torch.allclose(resumed[k], reference[k], atol=1e-6, rtol=0) for k in reference)


# ---------------------------------------------------------------------------------------------------------------------
# A full disk: the writer fails part-way; the message names the file, nothing half-written stays, the earlier state
# is intact and the same command goes on once there is room.

def fill_disk_after(monkeypatch, module, name, calls_allowed):
    """Make module.name (a writer) fail with ENOSPC after `calls_allowed` successful calls, having written part
    of its file first (as a real full disk does)."""
    real = getattr(module, name)
    count = {"n": 0}

    def writer(obj, path, *args, **kwargs):
        count["n"] += 1
        if count["n"] > calls_allowed:
            with open(path, "wb") as handle:
                handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *args, **kwargs)
    monkeypatch.setattr(module, name, writer)


def test_a_full_disk_while_caching_names_the_file_and_keeps_what_was_cached(tiny_model, subject_dir, tmp_path,
                                                                             monkeypatch):
    import cache_latents
    from common import files

    cache = tmp_path / "cache"
    args = ["--pretrained_model_name_or_path", tiny_model("sd1"), "--instance_data_dir", subject_dir,
            "--instance_prompt", "a photo of ohwx toy", "--output_dir", str(tmp_path / "out"), "--cache_dir",
            str(cache), "--resolution", "64"]
    fill_disk_after(monkeypatch, files, "save_file", 3)
    with pytest.raises(SystemExit, match=r"\.safetensors: the disk is full .*run the same command again"):
        cache_latents.main(args)
    written = [p for p in files_under(str(cache)).values()]
    assert len(written) == 3 and all(p.endswith(".safetensors") for p in written)  # no partial, no temporary
    assert_every_named_file_is_whole(str(cache))
    kept = read_bytes(cache)
    monkeypatch.undo()
    cache_latents.main(args)  # room again: the rest is made, and the whole equals an uninterrupted run's
    clean = tmp_path / "clean"
    cache_latents.main([*args[:-3], str(clean), "--resolution", "64"])
    assert read_bytes(cache) == {rel.replace("clean", "cache", 1): data for rel, data in read_bytes(clean).items()}
    assert all(read_bytes(cache)[rel] == data for rel, data in kept.items())  # what was written stayed as it was
    assert sum(rel.endswith(".safetensors") for rel in kept) == 3 and len(read_bytes(cache)) >= 9


def fail_checkpoint_4_with(monkeypatch, how):
    """Checkpoint-2 is written whole; checkpoint-4 fails part-way: "torch.save" (its optimiser file: a stream
    write error) or "disk full" (its trainable weights, through the safetensors writer every output uses)."""
    calls = {"n": 0}
    if how == "torch.save":
        real_save = torch.save

        def save(obj, path, *a, **k):  # checkpoint-2 writes rng, optimizer, scheduler; checkpoint-4 fails at optimizer
            calls["n"] += 1
            if calls["n"] == 5:
                with open(path, "wb") as handle:
                    handle.write(b"partial")
                raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
            return real_save(obj, path, *a, **k)
        monkeypatch.setattr(torch, "save", save)
    else:
        real_file = files.save_file

        def save_file(tensors, path, *a, **k):
            if "checkpoint-4" in path and "trainable" in path:
                with open(path, "wb") as handle:
                    handle.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_file(tensors, path, *a, **k)
        monkeypatch.setattr(files, "save_file", save_file)


@pytest.mark.parametrize("family,how,reason", [
    ("sd1", "torch.save", "RuntimeError: PytorchStreamWriter failed"),
    ("sd1", "disk full", "the disk is full while writing trainable.safetensors"),
    ("sd3", "disk full", "the disk is full while writing trainable.safetensors")])
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint_and_resumes(tiny_model, subject_dir, tmp_path,
                                                                             monkeypatch, family, how, reason):
    out = tmp_path / "out"
    args = train_argv(tiny_model(family), subject_dir, out, "--max_train_steps", "6", "--checkpointing_steps", "2",
                      "--cache_dir", tmp_path / "cache", "--resume_from_checkpoint", "latest")
    reference_out = tmp_path / "reference"
    train_dreambooth.main(train_argv(tiny_model(family), subject_dir, reference_out, "--max_train_steps", "6",
                                     "--checkpointing_steps", "2", "--cache_dir", tmp_path / "cache"))
    reference = load_file(str(reference_out / adapters.LORA_WEIGHTS_NAME))
    fail_checkpoint_4_with(monkeypatch, how)
    with pytest.raises(SystemExit) as failed:
        train_dreambooth.main(args)
    message = str(failed.value)
    assert message.startswith(f"could not write checkpoint {out / 'checkpoint-4'} ({reason}")
    assert "earlier checkpoints are intact" in message and "--resume_from_checkpoint latest" in message
    monkeypatch.undo()
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-2"]  # no temporary folder left
    before = trainable(out / "checkpoint-2")
    assert all(torch.isfinite(v).all() for v in before.values())
    train_dreambooth.main(args)  # room again: resumes from checkpoint-2 and ends where an uninterrupted run does
    resumed = load_file(str(out / adapters.LORA_WEIGHTS_NAME))
    assert all(torch.allclose(resumed[k], reference[k], atol=1e-6, rtol=0) for k in reference)
