"""Every family of the registry through one run that uses every feature at once: masks, a regularisation dataset
with the base-model prior target, differential output preservation, rollouts, LoRA dropout, EMA, the stable eval
loss, validation images, a checkpoint, and a resume from it; then a full fine-tune with the dataset prior target.
A family added to common/families/ is picked up here.

The per-feature value tests (the masked-out region gets no gradient, the prior keeps the class closer to the base
model, a rollout is the sampler's own, ...) live beside each feature and run on one or two families."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from conftest import predict, resolution_for, stock_pipeline, unet_inputs, write_json

from common import adapters, data, families
import make_demo
import train_dreambooth

FAMILIES = sorted(families.BY_NAME)  # the tiny models of examples/make_demo.py carry the families' names
EMA_FILE = "pytorch_lora_weights_ema.safetensors"


def feature_data(tmp_path, subject_dir, resolution):
    """The subject with half-black masks, three class pictures (regularisation), two held-out eval pictures."""
    os.makedirs(tmp_path / "masks")
    for name in os.listdir(subject_dir):
        width, height = Image.open(os.path.join(subject_dir, name)).size
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).rectangle((0, 0, width * 2 // 3, height), fill=255)
        mask.save(tmp_path / "masks" / name)
    reg = make_demo.make_subject_images(str(tmp_path / "class"), sizes=((64, 64),) * 3)
    held_out = make_demo.make_subject_images(str(tmp_path / "eval"), sizes=((96, 96),) * 2)
    return write_json(tmp_path / "data.json", [
        {"id": "subject", "instance_data_dir": subject_dir, "instance_prompt": "a photo of ohwx toy",
         "resolution": resolution, "conditioning_data": "masks"},
        {"id": "masks", "dataset_type": "conditioning", "conditioning_type": "mask",
         "instance_data_dir": str(tmp_path / "masks")},
        {"id": "class", "instance_data_dir": reg, "instance_prompt": "a photo of a toy", "resolution": resolution,
         "is_regularisation_data": True},
        {"id": "held-out", "dataset_type": "eval", "instance_data_dir": held_out,
         "instance_prompt": "a photo of ohwx toy", "resolution": resolution},
    ])


def prior_then_instance_first(config, seed):
    """For this seed the stream's first two batches (step 0's two micro-batches) are a regularisation and an instance
    batch, and a regularisation batch comes again later (found by replaying the stream: no model is loaded)."""
    args = train_dreambooth.parse_args(["--data_backend_config", config])
    datasets = data.load_datasets(args)
    sampler = train_dreambooth.BatchSampler(datasets, data.plan_datasets(datasets, seed), 1, seed)
    kinds = [sampler.next()[0][0].is_regularisation for _ in range(8)]
    return kinds[:2] == [True, False] and True in kinds[2:]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_feature_trains_together_reloads_and_resumes_exactly(tiny_model, subject_dir, tmp_path, family):
    model = tiny_model(family)
    config = feature_data(tmp_path, subject_dir, resolution_for(model))
    seed = next(s for s in range(200) if prior_then_instance_first(config, s))

    def argv(output_dir):
        return ["--pretrained_model_name_or_path", model, "--data_backend_config", config, "--output_dir",
                str(output_dir), "--seed", str(seed), "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
                "--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "5e-3", "--lora_rank", "4",
                "--lora_dropout", "0.1", "--dop_class", "toy", "--dop_trigger", "ohwx toy",
                "--scheduled_sampling_max_step_offset", "2", "--scheduled_sampling_probability", "1",
                "--use_ema", "--ema_decay", "0.7", "--eval_steps_interval", "2", "--eval_timesteps", "2",
                "--validation_prompt", "a photo of ohwx toy", "--validation_steps", "4", "--num_validation_images",
                "1", "--validation_num_inference_steps", "5", "--cache_dir", str(tmp_path / "cache"), "--report_to",
                "none"]

    result = train_dreambooth.main(argv(tmp_path / "whole"))
    records = [json.loads(line) for line in open(tmp_path / "whole" / "logs" / "train_log.jsonl")]
    steps = [r for r in records if "loss" in r]
    # Step 0: a fresh adapter is the base model, so both base-model targets (the class batch's prior, the instance
    # caption's DOP row) are met to rounding, however the rollouts moved x_t; the instance loss is not.
    assert steps[0]["loss/prior"] < 1e-10 and steps[0]["loss/dop"] < 1e-10 and steps[0]["loss/instance"] > 1e-4
    assert max(r.get("loss/prior", 0) for r in steps[1:]) > 1e-8  # later: the adapter has moved away
    assert sum(r["rollout_forwards"] for r in steps) > 0
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]
    assert all("eval_loss/ema" in r for r in records if r["step"] and "eval_loss" in r)
    folder = tmp_path / "whole" / "validation" / "step-4"
    assert Image.open(folder / "grid.png").size[0] > Image.open(next(folder.glob("prompt00-*.png"))).size[0]

    # The saved LoRA, loaded into the family's own pipeline with stock diffusers, predicts what the trained model does.
    unet = result["unet"].eval()
    inputs = unet_inputs(unet, family)
    pipe = stock_pipeline(model)
    pipe.load_lora_weights(str(tmp_path / "whole"))
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    assert torch.allclose(predict(denoiser, inputs), predict(unet, inputs), atol=1e-5)

    # Resumed from the checkpoint at step 2, the run ends where the uninterrupted one did: weights and average.
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    train_dreambooth.main(argv(tmp_path / "resumed") + ["--resume_from_checkpoint", "latest"])
    for name in (adapters.LORA_WEIGHTS_NAME, EMA_FILE):
        whole, again = (load_file(str(tmp_path / run / name)) for run in ("whole", "resumed"))
        assert whole.keys() == again.keys() and len(whole) > 0
        assert all(torch.allclose(whole[k], again[k], atol=1e-6, rtol=0) for k in whole), name

    # A full fine-tune (the dataset prior target: the class picture's own target, so its loss is not 0 at step 0)
    # with masks, rollouts and EMA: a whole pipeline, which the family's stock pipeline loads and predicts with.
    full_argv = [a for a in argv(tmp_path / "full") if a not in ("--dop_class", "toy", "--dop_trigger", "ohwx toy")]
    full_argv = full_argv[:full_argv.index("--lora_rank")] + full_argv[full_argv.index("--lora_dropout") + 2:]
    result = train_dreambooth.main(full_argv + ["--model_type", "full", "--learning_rate", "1e-4",
                                                "--max_train_steps", "2", "--validation_steps", "2"])
    records = [json.loads(line) for line in open(tmp_path / "full" / "logs" / "train_log.jsonl")]
    assert next(r for r in records if "loss" in r)["loss/prior"] > 1e-4
    trained = stock_pipeline(str(tmp_path / "full"))
    for pipeline in (trained, stock_pipeline(str(tmp_path / "full" / "ema"))):
        denoiser = pipeline.unet if hasattr(pipeline, "unet") else pipeline.transformer
        assert denoiser.dtype == torch.float32  # saved as trained
    denoiser = trained.unet if hasattr(trained, "unet") else trained.transformer
    assert torch.allclose(predict(denoiser, inputs), predict(result["unet"].eval(), inputs), atol=1e-5)
    assert not torch.allclose(predict(denoiser, inputs), predict(unet, inputs), atol=1e-5)
