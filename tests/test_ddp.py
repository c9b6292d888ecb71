"""Several processes (torchrun or accelerate launch; gloo on CPU) train one LoRA, and average gradients as one process
accumulating would; sharded (FSDP2) processes train a LoRA or the whole model as one process would, and resume
exactly."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, prior_argv, prior_data, train_argv
from safetensors.torch import load_file

from common import adapters, checkpoints, data
import train_dreambooth


def free_port():
    """A port nothing listens on now: each launch gets its own, so one test's lingering socket never blocks the next."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def launcher(name):
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    return [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes",
            "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            free_port()]


def run_launched(command):
    """Run a multi-process launch; if it hangs, kill every process it started (not only the launcher)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"the launch hung and was killed:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.mark.parametrize("family,launcher_name,extra", [("sd1", "accelerate", []),  # each launcher once
                                                        ("flux", "torchrun", ["--train_text_encoder"])])
def test_two_cpu_processes_train_the_lora_one_process_with_accumulation_would(tiny_model, subject_dir, tmp_path,
                                                                               family, launcher_name, extra):
    model = tiny_model(family)
    # Two processes x batch 1 see the same batches, with the same noise and rollouts, as one process x batch 1 x
    # accumulation 2; the main process keeps the EMA. A trained text encoder's gradients are synchronised too.
    common_flags = ["--train_batch_size", "1", "--max_train_steps", "3", "--checkpointing_steps", "2",
                    "--scheduled_sampling_max_step_offset", "3", "--use_ema", "--ema_decay", "0.5", *extra]
    single = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "single", *common_flags,
                                              "--gradient_accumulation_steps", "2"))
    argv = train_argv(model, subject_dir, tmp_path / "ddp", *common_flags)
    result = run_launched([*launcher(launcher_name), os.path.join(ROOT, "train_dreambooth.py"), *argv])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 process(es)" in result.stdout
    assert sorted(os.listdir(tmp_path / "ddp" / "checkpoint-2")) == [
        "README.md", "ema.safetensors", "optimizer.pt", "pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors",
        "rng_0.pt", "rng_1.pt", "scheduler.pt", "trainable.safetensors", "training_state.json"]
    for name in (adapters.LORA_WEIGHTS_NAME, "pytorch_lora_weights_ema.safetensors"):
        ddp = load_file(str(tmp_path / "ddp" / name))
        ours = load_file(str(tmp_path / "single" / name))
        assert ddp.keys() == ours.keys()
        # Summation order differs (all-reduce vs accumulation), and Adam divides each gradient by its own running
        # size, so a near-zero gradient's rounding shows up to ~1e-5 here; a wrong batch, noise or averaging would
        # move weights by the order of one step (lr 1e-3). A tenth of a step tells the two apart.
        for key in ours:
            assert torch.allclose(ddp[key], ours[key], atol=1e-4), key
        assert any(key.startswith("text_encoder.") for key in ours) == bool(extra)
    assert single["steps"] == 3


def test_lycoris_module_dropout_trains_under_ddp(tiny_model, subject_dir, tmp_path):
    """A dropped module leaves its weights without gradient in that step; DDP has to be told to expect it."""
    config = tmp_path / "lokr.json"
    config.write_text('{"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4, "module_dropout": 0.5, '
                      '"apply_preset": {"target_module": ["Attention", "FeedForward"]}}')
    argv = train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--train_batch_size", "1", "--lora_type",
                      "lycoris", "--lycoris_config", config, "--max_train_steps", "3")
    result = run_launched([*launcher("torchrun"), os.path.join(ROOT, "train_dreambooth.py"), *argv])
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(tmp_path / "out" / adapters.LORA_WEIGHTS_NAME)


def test_an_fsdp_config_is_refused_where_accelerate_would_not_shard(tiny_model, subject_dir, tmp_path):
    """accelerate selects FSDP only on GPUs: on CPUs an FSDP config would run as plain data parallel. The run stops
    with the reason before any model work, rather than train unsharded while the user expects sharding."""
    config = tmp_path / "fsdp.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 2\n"
                      "num_machines: 1\nmachine_rank: 0\nmixed_precision: 'no'\nfsdp_config:\n  fsdp_version: 2\n"
                      "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n  fsdp_cpu_ram_efficient_loading: false\n"
                      "  fsdp_state_dict_type: SHARDED_STATE_DICT\n")
    argv = train_argv(tiny_model("flux"), subject_dir, tmp_path / "out")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    result = run_launched([accelerate, "launch", "--config_file", str(config), "--main_process_port", free_port(),
                           os.path.join(ROOT, "train_dreambooth.py"), *argv])
    assert result.returncode != 0
    assert "asks for FSDP, but accelerate shards only on GPUs: here it would run as MULTI_CPU" in result.stderr
    assert not os.path.exists(tmp_path / "out")


def fsdp_launch(argv):
    """A 2-process launch of examples/fsdp.yaml as a GPU machine runs it (tests/fsdp_on_cpu.py says why)."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return run_launched([accelerate, "launch", "--config_file", os.path.join(ROOT, "examples", "fsdp.yaml"),
                         "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", free_port(),
                         os.path.join(ROOT, "tests", "fsdp_on_cpu.py"), os.path.join(ROOT, "train_dreambooth.py"),
                         *argv])


def mixed_step_seed(data_config, steps):
    """A seed whose batch stream, dealt to two processes, gives one of them a regularisation batch and the other an
    instance batch in the same step: the base-model prior then needs a forward pass on both."""
    args = train_dreambooth.parse_args(["--data_backend_config", data_config])
    datasets = data.load_datasets(args)
    for seed in range(100):
        sampler = train_dreambooth.BatchSampler(datasets, data.plan_datasets(datasets, seed), 1, seed)
        kinds = [sampler.next()[0][0].is_regularisation for _ in range(2 * steps)]
        if any(kinds[i] != kinds[i + 1] for i in range(0, 2 * steps, 2)):
            return seed
    raise AssertionError("no seed deals mixed batches")


@pytest.mark.parametrize("model_type", ["lora", "full"])
def test_two_sharded_processes_train_as_one_process_would_and_resume_exactly(tiny_model, subject_dir, tmp_path,
                                                                              model_type):
    """FSDP2 on FLUX: every weight, gradient and Adam moment is split between the processes. The LoRA (with the
    base-model prior: one process's prior batch makes both run the base model) and the full fine-tune end where one
    process accumulating two batches ends; the checkpoint holds each process's optimiser shard, and a sharded
    resume ends exactly where the uninterrupted sharded run did."""
    model = tiny_model("flux")
    config = prior_data(tmp_path, subject_dir)
    flags = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--model_type", model_type,
             "--learning_rate", "1e-3" if model_type == "lora" else "1e-4",
             "--prior_loss_target", "base_model" if model_type == "lora" else "dataset"]
    seed = mixed_step_seed(config, 3)
    train_dreambooth.main(prior_argv(model, config, tmp_path / "single", seed, *flags,
                                     "--gradient_accumulation_steps", "2"))
    result = fsdp_launch(prior_argv(model, config, tmp_path / "fsdp", seed, *flags))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 process(es)" in result.stdout
    checkpoint = tmp_path / "fsdp" / "checkpoint-2"
    assert {"optimizer_0.pt", "optimizer_1.pt", "trainable.safetensors"} <= set(os.listdir(checkpoint))
    assert "optimizer.pt" not in os.listdir(checkpoint)
    weights = adapters.LORA_WEIGHTS_NAME if model_type == "lora" else "transformer/diffusion_pytorch_model.safetensors"
    sharded, single = load_file(str(tmp_path / "fsdp" / weights)), load_file(str(tmp_path / "single" / weights))
    assert sharded.keys() == single.keys()
    for key in single:  # the same tolerance as the DDP test, for the same reason: a tenth of a step
        assert torch.allclose(sharded[key], single[key], atol=1e-4), key
    gathered = load_file(str(checkpoint / "trainable.safetensors"))  # the checkpoint's weights, whole
    single_checkpoint = load_file(str(tmp_path / "single" / "checkpoint-2" / "trainable.safetensors"))
    assert gathered.keys() == single_checkpoint.keys()
    assert all(torch.allclose(gathered[key], single_checkpoint[key], atol=1e-4) for key in gathered)
    if model_type == "full":  # the saved pipeline names the model's own classes (not FSDP's): it loads as any does
        index = json.load(open(tmp_path / "fsdp" / "model_index.json"))
        assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
        from diffusers import FluxTransformer2DModel

        loaded = FluxTransformer2DModel.from_pretrained(str(tmp_path / "fsdp"), subfolder="transformer").state_dict()
        assert all(torch.equal(loaded[key], sharded[key]) for key in sharded)
        return
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    result = fsdp_launch(prior_argv(model, config, tmp_path / "resumed", seed, *flags, "--resume_from_checkpoint",
                                    "latest"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    resumed = load_file(str(tmp_path / "resumed" / weights))
    assert all(torch.equal(resumed[key], sharded[key]) for key in sharded)
    # One process cannot take the shards' optimiser state over: said, naming the file and the fix.
    with pytest.raises(SystemExit, match="has no optimizer.pt: a sharded \\(FSDP\\) run of 2 process\\(es\\) wrote it"):
        train_dreambooth.main(prior_argv(model, config, tmp_path / "single-resume", seed, *flags,
                                         "--resume_from_checkpoint", str(checkpoint)))


def test_a_sharded_run_refuses_what_needs_the_whole_model_on_one_process(tiny_model, subject_dir, tmp_path,
                                                                          monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = train_dreambooth.parse_args(train_argv(tiny_model("flux"), subject_dir, tmp_path / "out",
                                                  "--validation_prompt", "a toy", "--use_ema", "--train_text_encoder"))
    sharded = SimpleNamespace(distributed_type=DistributedType.FSDP,
                              state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    with pytest.raises(SystemExit) as refused:
        checkpoints.check_sharding(sharded, args)
    assert "--validation_prompt: validation renders on the main process alone" in str(refused.value)
    assert "--use_ema: the average is kept whole by the main process" in str(refused.value)
    assert "--train_text_encoder: the text encoders run outside the sharded model" in str(refused.value)
    sharded.state.fsdp_plugin.fsdp_version = 1
    with pytest.raises(SystemExit, match="set 'fsdp_version: 2' as examples/fsdp.yaml does"):
        checkpoints.check_sharding(sharded, train_dreambooth.parse_args(train_argv(tiny_model("flux"), subject_dir,
                                                                                   tmp_path / "out")))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert checkpoints.check_sharding(sharded, args) is sharded  # an unsharded run is not touched by any of this
