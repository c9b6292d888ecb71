"""EMA of the trained weights: the average, its checkpoints, its files and its validation images."""

import json
import os
import shutil

import pytest
import torch
from conftest import model_info, predict, train_argv, unet_inputs, write_json
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from common import adapters, checkpoints, images, models
import train_dreambooth

EMA_FILE = "pytorch_lora_weights_ema.safetensors"


def test_the_default_ema_leaves_the_untrained_start_behind_in_a_dreambooth_length_run():
    """A weight that jumps from 0 to 1 at the first step: after 800 updates the default average (decay 0.999, warm-up
    on) is the new value, where decay 0.999 without warm-up would still hold 45 % of the start."""
    args = train_dreambooth.parse_args(["--use_ema"])
    assert args.ema_warmup is True
    for warmup, start_left in ((args.ema_warmup, 0.0), (False, 0.999 ** 800)):
        ema = train_dreambooth.EMA({"w": torch.zeros(1)}, args.ema_decay, warmup, "cpu")
        for _ in range(800):
            ema.update({"w": torch.ones(1)})
        assert ema.shadow["w"].item() == pytest.approx(1 - start_left, abs=1e-6)
        assert ema.start_share() == pytest.approx(start_left, abs=1e-12)
    assert 0.999 ** 800 == pytest.approx(0.449, abs=1e-3)


def test_ema_is_the_closed_form_average_of_the_recorded_weights(tiny_model, subject_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    model = tiny_model("sd1")
    out = tmp_path / "out"
    # A full fine-tune: the starting weights are the base model's, and a checkpoint every step records the rest.
    result = train_dreambooth.main(train_argv(model, subject_dir, out, "--model_type", "full", "--max_train_steps",
                                              "6", "--checkpointing_steps", "1", "--use_ema", "--ema_decay", "0.8",
                                              "--ema_warmup", "--ema_update_interval", "2"))
    start = {k: v.float() for k, v in models.load_component(model_info(model), "unet").named_parameters()}
    history = {step: load_file(str(out / f"checkpoint-{step}" / "trainable.safetensors")) for step in range(1, 6)}
    history[6] = {k: v.detach() for k, v in adapters.trainable_parameters(result["unet"]).items()}
    assert not torch.equal(history[2]["conv_in.weight"], history[4]["conv_in.weight"])

    def closed_form(steps):
        """sum_i w_i p_i with w_i = (1 - d_i) * prod_{j > i} d_j, plus prod_j d_j times the start."""
        decays = [min(0.8, (1 + s) / (10 + s)) for s in range(len(steps))]  # 0.1, 0.18.., 0.25: warm-up rules
        expected = {}
        for name, value in start.items():
            total = value * torch.tensor(decays).prod()
            for i, step in enumerate(steps):
                total = total + history[step][name] * (1 - decays[i]) * torch.tensor(decays[i + 1:]).prod()
            expected[name] = total
        return expected

    for steps, ema in (([2, 4, 6], result["ema"].shadow), ([2, 4], load_file(str(out / "checkpoint-4" /
                                                                                   "ema.safetensors")))):
        expected = closed_form(steps)
        assert ema.keys() == expected.keys()
        assert all(torch.allclose(ema[k], expected[k], atol=1e-6) for k in expected)
    assert result["ema"].updates == 3
    assert result["ema"].start_share() == pytest.approx(0.1 * 2 / 11 * 0.25)  # the start's share in the average
    assert "the EMA weights hold 0.5% of the starting weights after 3 updates (decay 0.8, warm-up)" in \
        capsys.readouterr().out
    # The full fine-tune's average is a complete pipeline in ema/, loadable like the raw one.
    saved = UNet2DConditionModel.from_pretrained(str(out / "ema"), subfolder="unet")
    assert all(torch.equal(param, result["ema"].shadow[name]) for name, param in saved.named_parameters())
    assert StableDiffusionPipeline.from_pretrained(str(out / "ema"), local_files_only=True).unet is not None
    decays = [json.loads(line).get("ema_decay") for line in open(out / "logs" / "train_log.jsonl")]
    assert decays == [None, 0.1, None, pytest.approx(2 / 11), None, 0.25]  # logged at each update


@pytest.mark.parametrize("adapter", ["lora", "lokr"])
def test_the_ema_adapter_loads_like_the_raw_one_and_differs_from_it(tiny_model, subject_dir, tmp_path, adapter):
    from diffusers import StableDiffusionPipeline

    model = tiny_model("sd1")
    extra = []
    if adapter == "lokr":
        config = write_json(tmp_path / "lokr.json", {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1,
                                                     "factor": 4, "apply_preset": {"target_module": ["Attention"]}})
        extra = ["--lora_type", "lycoris", "--lycoris_config", config]
    result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--use_ema", "--ema_decay", "0.7",
                                              "--learning_rate", "5e-3", *extra))
    unet, trainable = result["unet"], adapters.trainable_parameters(result["unet"])
    inputs = unet_inputs(unet, "sd1")
    raw = predict(unet, inputs)
    with result["ema"].applied(trainable):
        averaged = predict(unet, inputs)
    assert torch.equal(predict(unet, inputs), raw)  # the raw weights are back
    assert (raw - averaged).abs().max() > 1e-5

    def fresh():
        return StableDiffusionPipeline.from_pretrained(model, local_files_only=True)

    ema_file = str(tmp_path / "out" / EMA_FILE)
    assert torch.allclose(predict(adapters.load_adapter(fresh(), ema_file).unet, inputs), averaged, atol=1e-5)
    assert torch.allclose(predict(adapters.load_adapter(fresh(), str(tmp_path / "out")).unet, inputs), raw, atol=1e-5)
    with safe_open(ema_file, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["weights"] == "ema" and metadata["ema_updates"] == "4" and metadata["step"] == "4"
    assert float(metadata["ema_start_share"]) == pytest.approx(0.1 * 2 / 11 * 0.25 * 4 / 13, abs=1e-6)  # warm-up
    if adapter == "lora":  # stock diffusers reads it too
        pipe = fresh()
        pipe.load_lora_weights(str(tmp_path / "out"), weight_name=EMA_FILE)
        assert torch.allclose(predict(pipe.unet, inputs), averaged, atol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "flux"])  # every family: tests/test_families.py
def test_a_resumed_run_ends_with_the_ema_of_an_uninterrupted_one(tiny_model, subject_dir, tmp_path, family):
    """With LoRA dropout and rollouts (the flow Euler step for FLUX / SD3): resuming replays the run exactly."""
    model = tiny_model(family)

    def argv(output_dir):
        return train_argv(model, subject_dir, output_dir, "--max_train_steps", "6", "--checkpointing_steps", "3",
                          "--use_ema", "--ema_decay", "0.6", "--ema_warmup", "--lora_dropout", "0.1",
                          "--scheduled_sampling_max_step_offset", "3", "--cache_dir", tmp_path / "cache")

    train_dreambooth.main(argv(tmp_path / "whole"))
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    assert json.load(open(tmp_path / "resumed" / "checkpoint-3" / checkpoints.STATE_FILE))["ema_updates"] == 3
    resumed = train_dreambooth.main(argv(tmp_path / "resumed") + ["--resume_from_checkpoint", "latest"])
    assert resumed["ema"].updates == 6
    for name in (EMA_FILE, adapters.LORA_WEIGHTS_NAME):
        whole, again = (load_file(str(tmp_path / run / name)) for run in ("whole", "resumed"))
        assert whole.keys() == again.keys()
        assert all(torch.allclose(whole[k], again[k], atol=1e-6, rtol=0) for k in whole), name


def test_validation_renders_raw_and_ema_side_by_side(tiny_model, subject_dir, tmp_path):
    model = tiny_model("sd1")
    validation = ["--validation_prompt", "a photo of ohwx toy", "--validation_steps", "2", "--num_validation_images",
                  "2", "--validation_num_inference_steps", "2", "--max_train_steps", "2", "--learning_rate", "5e-2"]
    train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "both", "--use_ema", "--ema_decay", "0.5",
                                     *validation))
    folder = tmp_path / "both" / "validation" / "step-2"
    assert sorted(os.listdir(folder)) == ["grid.png", "prompt00-seed0.png", "prompt00-seed0_ema.png",
                                          "prompt00-seed1.png", "prompt00-seed1_ema.png", "prompts.txt"]
    assert Image.open(folder / "grid.png").size == (images.ROW_LABEL_WIDTH + 4 * 64, 64 + 14)  # raw | EMA, labelled
    raw, averaged = (Image.open(folder / name).tobytes() for name in ("prompt00-seed0.png", "prompt00-seed0_ema.png"))
    assert raw != averaged

    train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "ema", "--use_ema", "--validation_ema", "ema",
                                     *validation))
    assert sorted(n for n in os.listdir(tmp_path / "ema" / "validation" / "step-2") if n.endswith(".png")) == \
        ["grid.png", "prompt00-seed0_ema.png", "prompt00-seed1_ema.png"]
    with pytest.raises(SystemExit, match="--validation_ema both renders the EMA weights: add --use_ema"):
        train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "x", "--validation_ema", "both"))
    with pytest.raises(SystemExit, match="--ema_decay must lie between 0 and 1"):
        train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "x", "--use_ema", "--ema_decay", "1"))


def test_resuming_a_run_without_ema_starts_the_average_from_the_resumed_weights(tiny_model, subject_dir, tmp_path):
    model = tiny_model("sd1")
    argv = train_argv(model, subject_dir, tmp_path / "out", "--checkpointing_steps", "2", "--learning_rate", "5e-3")
    train_dreambooth.main(argv + ["--max_train_steps", "3"])
    resumed_from = load_file(str(tmp_path / "out" / "checkpoint-2" / "trainable.safetensors"))
    result = train_dreambooth.main(argv + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                                           "--use_ema", "--ema_decay", "0.9", "--ema_warmup", "false"])
    final = adapters.trainable_parameters(result["unet"])
    assert result["ema"].updates == 1
    for name, shadow in result["ema"].shadow.items():  # one update away from the checkpoint's weights
        assert torch.allclose(shadow, 0.9 * resumed_from[name] + 0.1 * final[name].detach(), atol=1e-7), name
