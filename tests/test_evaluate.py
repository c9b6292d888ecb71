"""evaluate.py and the scores: CLIP-T / CLIP-I / DINO, the shared eval loss, metrics and the report."""

import csv
import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import model_info, train_argv
from PIL import Image

from common import adapters, images, models, render, scores
import evaluate
import make_demo
import train_dreambooth


def test_dreambench_prompts_and_the_clip_t_text_side():
    objects, live = scores.dreambench_prompts("object"), scores.dreambench_prompts("live")
    assert len(objects) == len(live) == 25 and len(set(objects)) == 25
    assert "a {instance} wearing a santa hat" in live and "a {instance} floating in an ocean of milk" in objects
    assert objects[:10] == live[:10] and objects[-5:] == live[-5:] == [
        "a red {instance}", "a purple {instance}", "a shiny {instance}", "a wet {instance}",
        "a cube shaped {instance}"]
    assert scores.fill_prompt("a {instance} in the jungle", "ohwx dog", "dog") == ("a ohwx dog in the jungle",
                                                                               "a dog in the jungle")
    assert scores.fill_prompt("a photo of ohwx dog", "ohwx dog", "dog") == ("a photo of ohwx dog", "a photo of dog")
    assert scores.fill_prompt("a {class} next to a {instance}", "ohwx dog", "dog") == (
        "a dog next to a ohwx dog", "a dog next to a dog")


def pictures(count, seed):
    return [make_demo.draw_subject(48, 40, seed=seed + i) for i in range(count)]


def test_scores_agree_with_a_direct_computation(tiny_scorers):
    from transformers import CLIPModel, CLIPProcessor, ViTImageProcessorPil, ViTModel

    clip_folder, dino_folder = tiny_scorers
    scorer = scores.Scorer(clip_folder, dino_folder)
    generated, real = pictures(3, 0), pictures(2, 10)
    texts = ["a toy", "a red toy on a table", "a toy in the snow"]
    result = scorer.scores(generated, texts, scorer.clip_images(real), scorer.dino_images(real))

    # Directly: CLIPModel's own forward pass normalises image_embeds and text_embeds.
    model, processor = CLIPModel.from_pretrained(clip_folder).eval(), CLIPProcessor.from_pretrained(clip_folder)
    with torch.no_grad():
        out = model(**processor(text=texts, images=generated, padding=True, return_tensors="pt"))
        real_out = model(**processor(text=texts[:1], images=real, padding=True, return_tensors="pt"))
    clip_t = torch.stack([out.image_embeds[i] @ out.text_embeds[i] for i in range(3)]).mean()
    clip_i = torch.stack([a @ b for a in out.image_embeds for b in real_out.image_embeds]).mean()
    vit, vit_processor = ViTModel.from_pretrained(dino_folder).eval(), ViTImageProcessorPil.from_pretrained(dino_folder)
    with torch.no_grad():
        def cls(batch):
            token = vit(**vit_processor(images=batch, return_tensors="pt")).last_hidden_state[:, 0]
            return token / token.norm(dim=-1, keepdim=True)
        dino = (cls(generated) @ cls(real).T).mean()
    assert result["clip_t"] == pytest.approx(clip_t.item(), abs=1e-5)
    assert result["clip_i"] == pytest.approx(clip_i.item(), abs=1e-5)
    assert result["dino"] == pytest.approx(dino.item(), abs=1e-5)
    assert len({round(v, 3) for v in result.values()}) == 3

    same = scorer.scores(generated[:1], texts[:1], scorer.clip_images(generated[:1]), scorer.dino_images(generated[:1]))
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-5) and same["dino"] == pytest.approx(1.0, abs=1e-5)


def eval_argv(model, subject_dir, checkpoints, *extra):
    return ["--pretrained_model_name_or_path", model, "--checkpoints", str(checkpoints), "--instance_data_dir",
            subject_dir, "--instance_prompt", "ohwx toy", "--class_prompt", "toy", "--resolution", "64", "--seed", "7",
            "--eval_split", "2", "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--image_resolution",
            "64", *map(str, extra)]  # (FLUX's native size is 1024 px, whatever the model's width)


def log_records(output_dir):
    return [json.loads(line) for line in open(os.path.join(output_dir, "logs", "train_log.jsonl"))]


@pytest.mark.parametrize("family,model_type", [("sd1", "lora"), ("sd1", "full"), ("flux", "lora+text"),
                                               ("sd3", "full")])
def test_eval_loss_in_training_equals_evaluate_on_the_same_checkpoint(tiny_model, subject_dir, tmp_path, family,
                                                                      model_type):
    model = tiny_model(family)
    out = tmp_path / "out"
    text = ["--train_text_encoder"] if model_type == "lora+text" else []  # captions read by the trained encoders
    train_dreambooth.main(train_argv(model, subject_dir, out, "--model_type", model_type.split("+")[0],
                                     "--max_train_steps", "4", "--checkpointing_steps", "2", "--eval_split", "2",
                                     "--eval_steps_interval", "2", "--use_ema", "--ema_decay", "0.5", *text,
                                     prompt="ohwx toy"))
    logged = {r["step"]: r for r in log_records(out) if "eval_loss" in r}
    assert sorted(logged) == [0, 2, 4]
    for weights, key in (("raw", "eval_loss"), ("ema", "eval_loss/ema")):
        results = evaluate.main(eval_argv(model, subject_dir, out, "--clip_model", "none", "--weights", weights,
                                          "--evaluation_dir", tmp_path / weights, "--num_images_per_prompt", "1"))
        assert [(r["name"], r["step"]) for r in results] == [("base", 0), ("checkpoint-2", 2), ("final", 4)]
        for r in results:
            assert r["eval_loss"] == logged[r["step"]][key if r["step"] else "eval_loss"], (weights, r["name"])
            key_type = int if family == "sd1" else float  # DDPM timesteps, or flow noise levels
            assert r["eval_loss_per_timestep"] == {key_type(t): v for t, v in
                                                   logged[r["step"]]["eval_loss_per_timestep"].items()} or weights == "ema"
    assert logged[4]["eval_loss"] != logged[0]["eval_loss"] != logged[4]["eval_loss/ema"]


@pytest.fixture(scope="module")
def evaluated(tiny_model, tiny_scorers, tmp_path_factory):
    """One short training run (LoRA, checkpoint at step 2) evaluated with the DreamBench object prompts."""
    tmp_path = tmp_path_factory.mktemp("evaluated")
    subject = make_demo.make_subject_images(str(tmp_path / "subject"))
    model = tiny_model("sd1")
    train_dreambooth.main(train_argv(model, subject, tmp_path / "out", "--max_train_steps", "4",
                                     "--checkpointing_steps", "2", "--learning_rate", "1e-2", prompt="ohwx toy"))
    clip, dino = tiny_scorers
    results = evaluate.main(eval_argv(model, subject, tmp_path / "out", "--prompt_set", "dreambench", "--clip_model",
                                      clip, "--dino_model", dino))
    return tmp_path, model, results


def test_evaluate_writes_metrics_grids_and_plots(evaluated):
    tmp_path, model, results = evaluated
    folder = tmp_path / "out" / "evaluation"
    saved = json.load(open(folder / "metrics.json"))
    assert [r["name"] for r in saved["results"]] == ["base", "checkpoint-2", "final"]
    assert len(saved["prompts"]) == 25 and saved["prompts"][0] == "a ohwx toy in the jungle"
    for r in saved["results"]:
        assert all(-1 <= r[m] <= 1 for m in ("clip_t", "clip_i", "dino")) and r["eval_loss"] > 0
        assert list(r["eval_loss_per_timestep"]) == ["111", "222", "333", "444", "555", "666", "777", "888"]
        assert Image.open(folder / r["grid_path"]).size == (images.ROW_LABEL_WIDTH + 2 * 64, 25 * 64)  # seeds x prompts
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    assert [row["name"] for row in rows] == ["base", "checkpoint-2", "final"]
    assert float(rows[2]["clip_i"]) == pytest.approx(results[2]["clip_i"], abs=1e-6)
    for plot in ("scores.png", "eval_loss_by_timestep.png"):
        assert Image.open(folder / "plots" / plot).size[0] > 300
    # The same seeds for every model: the base images are the base pipeline's own, the trained ones differ.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    direct = pipe("a ohwx toy in the snow", height=64, width=64, num_inference_steps=2, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(1)).images[0]
    base = Image.open(folder / "images" / "base" / "p01-seed1.png")
    assert base.tobytes() == direct.tobytes()
    assert Image.open(folder / "images" / "final" / "p01-seed1.png").tobytes() != base.tobytes()


def test_the_report_embeds_every_grid_and_plot(evaluated):
    tmp_path, _, results = evaluated
    page = open(tmp_path / "out" / "evaluation" / "report.html", encoding="utf-8").read()
    sources = re.findall(r'<img[^>]* src="data:image/png;base64,([^"]+)"', page)
    assert len(sources) == 3 + 2  # a grid per model, two plots; nothing outside the page
    assert "a ohwx toy wearing" not in page and "a cube shaped ohwx toy" in page
    assert f"{results[2]['clip_t']:.4f}" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_the_report_shows_every_image_in_headless_chromium(evaluated, tmp_path):
    source = tmp_path / "report.html"
    shutil.copy(evaluated[0] / "out" / "evaluation" / "report.html", source)
    probe = ("<script>window.addEventListener('load', () => document.body.setAttribute('data-images', JSON.stringify("
             "[...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0 && i.naturalHeight > 0]))))"
             "</script>")
    source.write_text(source.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", source.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-images="([^"]*)"', dom)
    assert found, dom[-2000:]
    shown = json.loads(html.unescape(found.group(1)))
    assert len(shown) == 5 and all(loaded for _, loaded in shown), shown
    assert "Evaluation" in dom and "checkpoint-2" in dom


def test_bad_requests_are_refused_with_the_fix(tiny_model, subject_dir, tmp_path):
    model = tiny_model("sd1")
    with pytest.raises(SystemExit, match="no such folder"):
        evaluate.main(eval_argv(model, subject_dir, tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="no checkpoint-N folder and no trained output"):
        evaluate.main(eval_argv(model, subject_dir, tmp_path / "empty"))
    train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--max_train_steps", "1"))
    with pytest.raises(SystemExit, match="--only checkpoint-9: not found"):
        evaluate.main(eval_argv(model, subject_dir, tmp_path / "out", "--only", "checkpoint-9"))
    with pytest.raises(SystemExit, match="pass --class_prompt"):
        argv = eval_argv(model, subject_dir, tmp_path / "out", "--validation_prompt", "a {class}")
        argv.remove("--class_prompt")
        argv.remove("toy")
        evaluate.main(argv)


def test_training_scores_validation_images_with_clip(tiny_model, tiny_scorers, subject_dir, tmp_path):
    clip, _ = tiny_scorers
    train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--max_train_steps", "2",
                                     "--validation_prompt", "a {instance} on the beach", "--validation_instance",
                                     "ohwx toy", "--validation_class", "toy", "--validation_steps", "2",
                                     "--num_validation_images", "2", "--validation_num_inference_steps", "2",
                                     "--evaluation_type", "clip", "--clip_model", clip))
    [logged] = [r for r in log_records(tmp_path / "out") if "validation/clip_t" in r]
    folder = tmp_path / "out" / "validation" / "step-2"
    drawn = [Image.open(folder / f"prompt00-seed{s}.png") for s in (0, 1)]
    scorer = scores.Scorer(clip)
    subject = [images.load_image(os.path.join(subject_dir, n)) for n in sorted(os.listdir(subject_dir))]
    expected = scorer.scores(drawn, ["a toy on the beach"] * 2, scorer.clip_images(subject))
    assert logged["step"] == 2
    assert logged["validation/clip_t"] == pytest.approx(expected["clip_t"], abs=1e-5)
    assert logged["validation/clip_i"] == pytest.approx(expected["clip_i"], abs=1e-5)


@pytest.mark.parametrize("adapter", ["lora", "lokr"])
def test_each_model_is_applied_and_removed_without_a_trace(tiny_model, subject_dir, tmp_path, adapter):
    from conftest import model_info, predict, unet_inputs

    model = tiny_model("sd1")
    extra = []
    if adapter == "lokr":
        config = tmp_path / "lokr.json"
        config.write_text('{"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4}')
        extra = ["--lora_type", "lycoris", "--lycoris_config", config]
    result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--learning_rate", "1e-2", *extra))
    info = model_info(model)
    pipe = models.load_pipeline(info)
    inputs = unet_inputs(pipe.unet, "sd1")
    before = predict(pipe.unet, inputs)
    [*_, final] = evaluate.find_targets(str(tmp_path / "out"), None, "raw")
    assert final[:3] == ("final", 4, "adapter")
    with evaluate.weights_of(pipe, final, info):
        assert torch.allclose(predict(pipe.unet, inputs), predict(result["unet"], inputs), atol=1e-5)
    assert torch.equal(predict(pipe.unet, inputs), before) and not hasattr(pipe.unet, "lycoris")


def test_bf16_runs_evaluate_to_their_logged_eval_loss(tiny_model, subject_dir, tmp_path):
    model = tiny_model("sd1")
    out = tmp_path / "out"
    train_dreambooth.main(train_argv(model, subject_dir, out, "--mixed_precision", "bf16", "--max_train_steps", "2",
                                     "--checkpointing_steps", "1", "--eval_split", "2", "--eval_steps_interval", "1",
                                     prompt="ohwx toy"))
    logged = {r["step"]: r["eval_loss"] for r in log_records(out) if "eval_loss" in r}
    results = evaluate.main(eval_argv(model, subject_dir, out, "--mixed_precision", "bf16", "--clip_model", "none",
                                      "--num_images_per_prompt", "1"))
    assert {r["step"]: r["eval_loss"] for r in results} == logged
    fp32 = evaluate.main(eval_argv(model, subject_dir, out, "--clip_model", "none", "--num_images_per_prompt", "1",
                                   "--evaluation_dir", tmp_path / "fp32"))
    assert fp32[-1]["eval_loss"] != logged[2]  # the precision matters, hence the flag


def test_old_or_partial_checkpoints_are_skipped_and_the_instance_is_required(tiny_model, subject_dir, tmp_path,
                                                                            capsys):
    model = tiny_model("sd1")
    out = tmp_path / "out"
    train_dreambooth.main(train_argv(model, subject_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    os.remove(out / "checkpoint-1" / adapters.LORA_WEIGHTS_NAME)  # as an older version wrote them
    names = [t[0] for t in evaluate.find_targets(str(out), None, "raw")]
    assert names == ["base", "final"] and "skipped" in capsys.readouterr().out
    argv = eval_argv(model, subject_dir, out, "--clip_model", "none")
    argv[argv.index("--instance_prompt"):argv.index("--instance_prompt") + 2] = []
    with pytest.raises(SystemExit, match="--instance_prompt .* is needed"):
        evaluate.main(argv)


def test_the_vae_decodes_outside_autocast_in_its_own_precision(tiny_model):
    """Validation and evaluate.py draw under autocast (fp16 on GPUs; bf16 stands in on CPU). The SDXL denoiser runs
    under it; the VAE, held in fp32, decodes outside it in fp32 (under fp16 autocast SDXL's VAE overflows), and the
    picture equals the one an fp32 decode of the same latents gives."""
    info = model_info(tiny_model("sdxl"))
    pipe = models.load_pipeline(info)
    seen = {}

    def record(name):
        def hook(module, inputs):
            seen[name] = (torch.is_autocast_enabled("cpu"), inputs[0].dtype)
        return hook

    pipe.unet.register_forward_pre_hook(record("unet"))
    pipe.vae.decoder.conv_in.register_forward_pre_hook(record("vae"))
    options = render.drawing_options(info, None, 2, 1.0, None, 64)
    [[image]] = render.render(pipe, ["a photo of ohwx toy"], 1, 0, options,
                              autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert seen["unet"][0] is True  # the denoiser under autocast
    assert seen["vae"] == (False, torch.float32)  # the decode outside it, in the VAE's fp32
    assert "decode" not in vars(pipe.vae)  # the pipeline's VAE is its own again
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        latents = pipe(prompt="a photo of ohwx toy", generator=torch.Generator().manual_seed(0), output_type="latent",
                       **options).images
    with torch.no_grad():
        decoded = pipe.vae.decode((latents / pipe.vae.config.scaling_factor).float()).sample  # unscaled as drawn
    expected = pipe.image_processor.postprocess(decoded)[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))
