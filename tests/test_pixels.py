"""DeepFloyd IF, the pixel-space family, both stages: the cache holds the pictures themselves (masks at full
resolution), the loss is the noise half of the UNet's output (stage II's input: the picture shrunk, enlarged back and
noised, as its pipeline gives it), the LoRA reloads in the stock IFPipeline / IFSuperResolutionPipeline in a fresh
process, validation and evaluate.py draw as diffusers' guide runs a trained IF (fixed variance; stage II enlarging
small subject pictures), and what does not apply is refused. The features every family has (LyCORIS, masks, prior,
rollouts, EMA, resume, eval loss, evaluate.py, webhooks) are tested on IF beside the other families, in their own
test files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import first_step, predict, stock_pipeline, train_argv, unet_inputs, write_json
from PIL import Image, ImageDraw

import evaluate
import make_regularisation
import train_dreambooth
from common import data, files, images, render


@pytest.mark.parametrize("family", ["if", "if-ii"])
def test_the_cache_holds_each_picture_as_training_sees_it_and_its_mask_at_full_resolution(tiny_model, subject_dir,
                                                                                          tmp_path, family):
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
    argv = ["--pretrained_model_name_or_path", tiny_model(family), "--data_backend_config", config, "--output_dir",
            str(tmp_path / "out"), "--max_train_steps", "1", "--seed", "3"]
    train_dreambooth.main(argv)
    args = train_dreambooth.parse_args(argv)
    datasets, info, plans = data.prepare(args, print_fn=lambda *a: None)
    assert info.family == family and info.vae_scale_factor == 1 and info.latent_scaling() == (0.0, 1.0)
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
    step = {"if": 8, "if-ii": 32}[family]  # stage I's buckets: 8 px; stage II's: 4 x that, what it enlarges
    assert len(shapes) == 3 and all(side % step == 0 for shape in shapes for side in shape[1:]), shapes


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


def test_stage_2_first_step_loss_reads_the_picture_shrunk_enlarged_and_noised_as_its_pipeline_gives_it(
        tiny_model, subject_dir, tmp_path):
    """Stage II's UNet takes the noisy picture and, beside it, the same picture shrunk 4x (each 4 x 4 block averaged),
    enlarged back as IFSuperResolutionPipeline enlarges (bilinear, corners aligned) and noised by its
    image_noising_scheduler at a level drawn from 0 to --if_noise_level, given as the class label: the logged loss
    of step 1 is MSE(the first 3 output channels, eps) on that input, computed here by hand. The shrunk picture is
    what validation gives the pipeline (PIL's reduce), up to 8-bit rounding."""
    from diffusers import DDPMScheduler

    model = tiny_model("if-ii")
    logged, _, entry, caption, generator = first_step(model, subject_dir, tmp_path / "out", "--if_noise_level", "600")
    seen = images.apply_transform(images.load_image(entry.path), entry.transform)
    picture = images.image_to_tensor(seen)[None]
    torch.randn(picture.shape[1:], generator=generator)  # the latent's sample (a VAE cache's std), unused here
    noise = torch.randn(picture.shape, generator=generator)
    timestep = torch.randint(0, 1000, (1,), generator=generator)
    level = torch.randint(0, 601, (1,), generator=generator)
    small = picture.reshape(1, 3, picture.shape[2] // 4, 4, picture.shape[3] // 4, 4).mean(dim=(3, 5))
    assert (small - images.image_to_tensor(seen.reduce(4))[None]).abs().max() <= 1 / 127.5 + 1e-6
    upscaled = torch.nn.functional.interpolate(small, picture.shape[2:], mode="bilinear", align_corners=True)
    pipe = stock_pipeline(model)
    upscaled = pipe.image_noising_scheduler.add_noise(upscaled, torch.randn(upscaled.shape, generator=generator),
                                                      level)
    noisy = DDPMScheduler.from_pretrained(model, subfolder="scheduler").add_noise(picture, noise, timestep)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False, device="cpu", clean_caption=False)
        output = pipe.unet(torch.cat([noisy, upscaled], dim=1), timestep, encoder_hidden_states=embeds,
                           class_labels=level).sample
        other = pipe.unet(torch.cat([noisy, upscaled], dim=1), timestep, encoder_hidden_states=embeds,
                          class_labels=level + 300).sample
    assert logged == pytest.approx(torch.nn.functional.mse_loss(output[:, :3], noise).item(), rel=1e-5)
    assert logged != pytest.approx(torch.nn.functional.mse_loss(other[:, :3], noise).item(), rel=1e-4)


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


@pytest.mark.parametrize("family", ["if", "if-ii"])
def test_if_lora_reloads_in_the_stock_pipeline_in_a_fresh_process(tiny_model, subject_dir, tmp_path, family):
    """IFPipeline (stage II: IFSuperResolutionPipeline).load_lora_weights in another process gives the trained UNet's
    prediction (both halves), with the LoRA on IF's own text keys and values (add_k_proj / add_v_proj) as well as
    the attention's."""
    model, out = tiny_model(family), tmp_path / "out"
    ours = train_dreambooth.main(train_argv(model, subject_dir, out, "--learning_rate", "1e-2"))["unet"].eval()
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in ours.named_parameters() if ".lora_A" in name}
    assert adapted == {"to_q", "to_k", "to_v", "0", "add_k_proj", "add_v_proj"}  # "0": to_out.0
    inputs = unet_inputs(ours, family)
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


def test_stage_2_validation_and_evaluate_enlarge_small_subject_pictures_as_the_stock_pipeline_does(
        tiny_model, subject_dir, tmp_path, capsys):
    """Stage II validation enlarges subject pictures (chosen per run, as training saw them, shrunk 4x) with their
    captions as prompts: each is, pixel for pixel, what a stock IFSuperResolutionPipeline with the saved LoRA and the
    fixed variance draws from that small picture at the same seed, --if_noise_level and size (4x its own), and the
    grid's rows start with it. evaluate.py, given the training config, draws the same pictures and measures the eval
    loss training logged (the low-resolution input's noise fixed per example)."""
    from diffusers import DDPMScheduler

    model, out = tiny_model("if-ii"), tmp_path / "out"
    config = write_json(tmp_path / "config.json", {
        "pretrained_model_name_or_path": model, "instance_data_dir": subject_dir,
        "instance_prompt": "a photo of ohwx toy", "output_dir": str(out), "resolution": 32, "seed": 7,
        "train_batch_size": 2, "max_train_steps": 2, "learning_rate": 1e-2, "lora_rank": 4,
        "validation_prompt": "ignored", "validation_steps": 2, "num_validation_images": 2,
        "validation_num_inference_steps": 3, "if_noise_level": 100, "eval_split": 1, "eval_steps_interval": 2})
    train_dreambooth.main(["--config", config])
    assert "2 subject image(s) are shrunk 4x and enlarged back, noised at level 100" in capsys.readouterr().out
    args = train_dreambooth.parse_args(["--config", config])
    datasets, info, plans = data.prepare(args, print_fn=lambda *a: None)
    data.eval_sets(datasets, plans, args.eval_split)
    sources = render.refine_sources(info, plans[data.subject_dataset(datasets).id], 2, args.validation_seed)
    pipe = stock_pipeline(model)
    pipe.load_lora_weights(str(out))
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type="fixed_small")
    folder = out / "validation" / "step-2"
    assert (folder / "prompts.txt").read_text().splitlines() == [caption for caption, _ in sources]
    for p, (caption, small) in enumerate(sources):
        validation = np.asarray(Image.open(folder / f"prompt{p:02d}-seed0.png"))
        assert validation.shape == (4 * small.height, 4 * small.width, 3)
        theirs = pipe(caption, image=small, height=4 * small.height, width=4 * small.width, num_inference_steps=3,
                      guidance_scale=4.0, noise_level=100, generator=torch.Generator().manual_seed(0),
                      clean_caption=False).images[0]
        assert np.array_equal(validation, np.asarray(theirs)), p
    cell = 4 * sources[0][1].width  # the first row's drawn picture sets the cells; its source is enlarged to it
    assert Image.open(folder / "grid.png").width == images.ROW_LABEL_WIDTH + 2 * cell  # source | drawn

    results = evaluate.main(["--config", config, "--clip_model", "none"])
    logged = {r["step"]: r for r in map(json.loads, open(out / "logs" / "train_log.jsonl")) if "eval_loss" in r}
    assert [(r["name"], r["step"]) for r in results] == [("base", 0), ("final", 2)]
    assert all(r["eval_loss"] == logged[r["step"]]["eval_loss"] for r in results)
    for p in range(2):
        assert np.array_equal(np.asarray(Image.open(out / "evaluation" / "images" / "final" / f"p{p:02d}-seed0.png")),
                              np.asarray(Image.open(folder / f"prompt{p:02d}-seed0.png")))


@pytest.mark.parametrize("family,flags,message", [
    ("if-ii", ["--validation_resolution", "64"], "--validation_resolution applies to models that draw from a prompt"),
    ("if", ["--if_noise_level", "100"], "--if_noise_level applies to DeepFloyd IF stage II"),
    ("if-ii", ["--if_noise_level", "1000"], "the image-noising scheduler's levels are 0 to 999"),
])
def test_what_does_not_apply_to_a_stage_is_refused_before_any_work(tiny_model, subject_dir, tmp_path, family, flags,
                                                                   message):
    with pytest.raises(SystemExit, match=message):
        train_dreambooth.main(train_argv(tiny_model(family), subject_dir, tmp_path / "out", *flags))
    assert not os.path.exists(tmp_path / "out" / "cache")
    if family == "if-ii":  # nor can stage II draw class pictures from a prompt
        with pytest.raises(SystemExit, match="stage II: it enlarges pictures and cannot draw class images"):
            make_regularisation.main(["--pretrained_model_name_or_path", tiny_model(family), "--class_prompt", "a toy",
                                      "--num_images", "1", "--output_dir", str(tmp_path / "class")])


@pytest.mark.parametrize("flags,message", [
    (["--preview_vae", "madebyollin/taesd"], "--preview_vae applies to families with a Tiny AutoEncoder for their VAE"),
    (["--t5_max_sequence_length", "128"], "--t5_max_sequence_length applies to SD3, FLUX.1 and Chroma"),
    (["--lora_format", "comfyui"], "--lora_format applies to the families with a kohya / ComfyUI layout"),
    (["--data_aesthetic_score", "6"], "--data_aesthetic_score applies to the SDXL refiner"),
    (["--flux_guidance_value", "3.5"], "--flux_guidance_value applies to a guidance-distilled FLUX.1"),
    (["--train_text_encoder"], "reads its captions with T5EncoderModel alone"),
    (["--pretrained_vae_model_name_or_path", "madebyollin/sdxl-vae-fp16-fix"], "works on pixels and has no VAE"),
])
def test_what_does_not_apply_to_if_is_refused_before_any_work(tiny_model, subject_dir, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        train_dreambooth.main(train_argv(tiny_model("if"), subject_dir, tmp_path / "out", *flags))
    assert not os.path.exists(tmp_path / "out" / "cache")  # nothing was cached
