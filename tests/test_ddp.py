"""Several processes (torchrun or accelerate launch; gloo on CPU) train one LoRA, and average gradients as one process accumulating would."""

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, train_argv
from safetensors.torch import load_file

from common import adapters
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


@pytest.mark.parametrize("family,launcher_name", [("sd1", "accelerate"), ("flux", "torchrun")])  # each launcher once
def test_two_cpu_processes_train_the_lora_one_process_with_accumulation_would(tiny_model, subject_dir, tmp_path,
                                                                               family, launcher_name):
    model = tiny_model(family)
    # Two processes x batch 1 see the same batches, with the same noise and rollouts, as one process x batch 1 x
    # accumulation 2; the main process keeps the EMA.
    common_flags = ["--train_batch_size", "1", "--max_train_steps", "3", "--checkpointing_steps", "2",
                    "--scheduled_sampling_max_step_offset", "3", "--use_ema", "--ema_decay", "0.5"]
    single = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "single", *common_flags,
                                              "--gradient_accumulation_steps", "2"))
    argv = train_argv(model, subject_dir, tmp_path / "ddp", *common_flags)
    result = run_launched([*launcher(launcher_name), os.path.join(ROOT, "train_dreambooth.py"), *argv])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 process(es)" in result.stdout
    assert sorted(os.listdir(tmp_path / "ddp" / "checkpoint-2")) == [
        "ema.safetensors", "optimizer.pt", "pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors",
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
