"""DeepFloyd IF stage I, the pixel-space family: the cache holds the pictures themselves (masks at full resolution),
the loss is the noise half of the UNet's output, the LoRA reloads in the stock IFPipeline in a fresh process,
validation draws as diffusers' guide runs a trained IF (fixed variance), and what does not apply is refused.
The features every family has (LyCORIS, masks, prior, rollouts, EMA, resume, eval loss, evaluate.py, webhooks) are
tested on IF beside the other families, in their own test files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import first_step, predict, stock_pipeline, train_argv, unet_inputs, write_json
from PIL import Image, ImageDraw

import train_dreambooth
from common import data, files, images, models


def test_the_cache_holds_each_picture_as_training_sees_it_and_its_mask_at_full_resolution(tiny_model, subject_dir,
                                                                                          tmp_path):
    """No VAE: the cached "mean" is the resized, cropped picture in [-1, 1], with nothing to sample (no "std"), and
    the mask is the picture's own resize and crop of it, one value per pixel."""
    os.makedirs(tmp_path / "masks")
    for name in os.listdir(subject_dir):
        width, height = Image.open(os.path.join(subject_dir, name)).size
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=255)
        mask.save(tmp_path / "masks" / name)
    config = write_json(tmp_path / "data.json", [
        {"id": "subject", "instance_data_dir": subject_dir, "instance_prompt": "a photo of ohwx toy", "resolution": 32,
         "conditioning_data": "masks"},
        {"id": "masks", "dataset_type": "conditioning", "conditioning_type": "mask",
         "instance_data_dir": str(tmp_path / "masks")}])
    argv = ["--pretrained_model_name_or_path", tiny_model("if"), "--data_backend_config", config, "--output_dir",
            str(tmp_path / "out"), "--max_train_steps", "1", "--seed", "3"]
    train_dreambooth.main(argv)
    args = train_dreambooth.parse_args(argv)
    datasets, info, plans = data.prepare(args, print_fn=lambda *a: None)
    assert info.family == "if" and info.vae_scale_factor == 1 and models.latent_scaling(info) == (0.0, 1.0)
    shapes = set()
    for entry in plans["subject"]:
        cached = files.load_tensors(entry.cache_path)
        picture = images.apply_transform(images.load_image(entry.path), entry.transform)
        assert sorted(cached) == ["mask", "mean"]
        assert torch.equal(cached["mean"], images.image_to_tensor(picture))
        mask = images.apply_transform(images.load_mask(entry.mask_path), entry.transform, Image.BILINEAR)
        assert torch.equal(cached["mask"][0], torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0))
        shapes.add(tuple(cached["mean"].shape))
        assert cached["mean"].shape[1:] == (picture.height, picture.width)
    assert len(shapes) == 3 and all(side % 8 == 0 for shape in shapes for side in shape[1:])  # IF's buckets: 8 px


def test_first_step_loss_is_the_noise_half_of_the_unets_output_computed_by_hand(tiny_model, subject_dir, tmp_path):
    """IF's UNet predicts 6 channels, the noise and the range of its learned variance: the logged loss of step 1 is
    MSE(the first 3 channels, eps) at x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps on IF's cosine schedule, where x0
    is the picture itself and the text is T5's masked reading of the caption."""
    from diffusers import DDPMScheduler

    model = tiny_model("if")
    logged, _, entry, caption, generator = first_step(model, subject_dir, tmp_path / "out")
    picture = images.image_to_tensor(images.apply_transform(images.load_image(entry.path), entry.transform))[None]
    torch.randn(picture.shape[1:], generator=generator)  # the latent's sample (a VAE cache's std), unused here
    noise = torch.randn(picture.shape, generator=generator)
    timestep = torch.randint(0, 1000, (1,), generator=generator)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    assert scheduler.config.variance_type == "learned_range" and scheduler.config.beta_schedule == "squaredcos_cap_v2"
    noisy = scheduler.add_noise(picture, noise, timestep)
    pipe = stock_pipeline(model)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False, device="cpu", clean_caption=False)
        output = pipe.unet(noisy, timestep, encoder_hidden_states=embeds).sample
    assert output.shape[1] == 6
    assert logged == pytest.approx(torch.nn.functional.mse_loss(output[:, :3], noise).item(), rel=1e-5)
    assert logged != pytest.approx(torch.nn.functional.mse_loss(output[:, 3:], noise).item(), rel=1e-3)


RELOAD = """
import json, sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from conftest import predict, stock_pipeline
case = torch.load({case!r})
pipe = stock_pipeline({model!r})
base = predict(pipe.unet, case["inputs"])
pipe.load_lora_weights({out!r})
reloaded = predict(pipe.unet, case["inputs"])
print(json.dumps({{"ours": (reloaded - case["expected"]).abs().max().item(),
                   "moved": (reloaded - base).abs().max().item()}}))
"""


def test_if_lora_reloads_in_the_stock_pipeline_in_a_fresh_process(tiny_model, subject_dir, tmp_path):
    """IFPipeline.load_lora_weights in another process gives the trained UNet's prediction (both halves), with the
    LoRA on IF's own text keys and values (add_k_proj / add_v_proj) as well as the attention's."""
    model, out = tiny_model("if"), tmp_path / "out"
    ours = train_dreambooth.main(train_argv(model, subject_dir, out, "--learning_rate", "1e-2"))["unet"].eval()
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in ours.named_parameters() if ".lora_A" in name}
    assert adapted == {"to_q", "to_k", "to_v", "0", "add_k_proj", "add_v_proj"}  # "0": to_out.0
    inputs = unet_inputs(ours, "if")
    torch.save({"inputs": inputs, "expected": predict(ours, inputs)}, str(tmp_path / "case.pt"))
    tests = os.path.dirname(os.path.abspath(__file__))
    script = RELOAD.format(root=os.path.dirname(tests), tests=tests, case=str(tmp_path / "case.pt"), model=model,
                           out=str(out))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    assert numbers["ours"] < 1e-5 and numbers["moved"] > 1e-4, numbers


def test_validation_draws_as_the_stock_pipeline_with_the_lora_and_a_fixed_variance(tiny_model, subject_dir, tmp_path):
    """Only the noise half is trained, so the trained model draws with variance_type="fixed_small" (diffusers'
    guide for an IF LoRA): the validation picture is, pixel for pixel, what a stock IFPipeline with the saved LoRA and
    that scheduler draws at the same seed, and not what the learned variance draws. With T5 in int8
    (--text_encoder_precision, the T5-XXL being IF's largest part) the run trains and draws too."""
    from diffusers import DDPMScheduler

    model, out = tiny_model("if"), tmp_path / "out"
    prompt, steps = "a photo of ohwx toy", 4
    train_dreambooth.main(train_argv(model, subject_dir, out, "--learning_rate", "1e-2", "--validation_prompt",
                                     prompt, "--validation_steps", "4", "--num_validation_images", "1",
                                     "--validation_num_inference_steps", steps, "--validation_guidance_scale", "4",
                                     "--validation_resolution", "24"))
    validation = np.asarray(Image.open(out / "validation" / "step-4" / "prompt00-seed0.png"))
    assert validation.shape == (24, 24, 3)

    def draw(variance_type):
        pipe = stock_pipeline(model)
        pipe.load_lora_weights(str(out))
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type=variance_type)
        picture = pipe(prompt, num_inference_steps=steps, guidance_scale=4.0, height=24, width=24,
                       generator=torch.Generator().manual_seed(0), clean_caption=False).images[0]
        return np.asarray(picture)

    assert np.array_equal(validation, draw("fixed_small"))
    assert not np.array_equal(validation, draw("learned_range"))

    train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "int8", "--max_train_steps", "1",
                                     "--text_encoder_precision", "int8-quanto", "--validation_prompt", prompt,
                                     "--validation_steps", "1", "--validation_num_inference_steps", "2"))
    assert (tmp_path / "int8" / "validation" / "step-1" / "grid.png").exists()
    assert json.load(open(tmp_path / "int8" / "args.json"))["text_encoder_1_precision"] == "int8-quanto"


@pytest.mark.parametrize("flags,message", [
    (["--preview_vae", "madebyollin/taesd"], "--preview_vae applies to families with a VAE"),
    (["--t5_max_sequence_length", "128"], "--t5_max_sequence_length applies to SD3 and FLUX.1"),
    (["--lora_format", "comfyui"], "--lora_format applies to the families ComfyUI and A1111"),
    (["--data_aesthetic_score", "6"], "--data_aesthetic_score applies to the SDXL refiner"),
    (["--flux_guidance_value", "3.5"], "--flux_guidance_value applies to a guidance-distilled FLUX.1"),
    (["--train_text_encoder"], "reads its captions with T5 alone"),
    (["--pretrained_vae_model_name_or_path", "madebyollin/sdxl-vae-fp16-fix"], "works on pixels and has no VAE"),
])
def test_what_does_not_apply_to_if_is_refused_before_any_work(tiny_model, subject_dir, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        train_dreambooth.main(train_argv(tiny_model("if"), subject_dir, tmp_path / "out", *flags))
    assert not os.path.exists(tmp_path / "out" / "cache")  # nothing was cached
