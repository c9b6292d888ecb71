"""SDXL refiner training: text encoder 2 only, 5-value time ids with the aesthetic score, low-noise
timesteps, its own text cache, img2img validation and evaluation."""

import json
import os

import pytest
import torch
from conftest import model_info, predict, train_argv, unet_inputs, write_json
from PIL import Image

from common import images, models
import evaluate
import train_dreambooth


def refiner_pipeline(model):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline.from_pretrained(model, local_files_only=True)


def test_prompt_embeddings_and_time_ids_equal_the_refiner_pipeline(tiny_model):
    model = tiny_model("sdxl-refiner")
    info = model_info(model, data_aesthetic_score=6.5)
    prompts = ["a photo of ohwx toy", "a toy"]
    ours = info.encode_prompt(*models.load_text_encoders(info), prompts)
    pipe = refiner_pipeline(model)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(ours["prompt_embeds"], embeds) and torch.equal(ours["pooled_prompt_embeds"], pooled)
    transform = {"original_size": [640, 480], "crop_box": [32, 16, 544, 528], "target_size": [512, 512],
                 "resized_size": [683, 512], "downsampled_size": [640, 480]}
    expected, _ = pipe._get_add_time_ids((480, 640), (16, 32), (512, 512), 6.5, 2.5, (480, 640), (0, 0), (512, 512),
                                         dtype=torch.float32,
                                         text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(info.time_ids(transform)[None], expected)


def capture_training_calls(monkeypatch):
    """The trained forward passes' timesteps and added conditioning."""
    seen = []
    load_component = models.load_component

    def load(info, name, *args, **kwargs):
        component = load_component(info, name, *args, **kwargs)
        if name == "unet":
            def hook(module, args, kwargs):
                if torch.is_grad_enabled():
                    seen.append((args[1].clone(), {k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()}))
            component.register_forward_pre_hook(hook, with_kwargs=True)
        return component

    monkeypatch.setattr(models, "load_component", load)
    return seen


def test_refiner_lora_trains_on_low_noise_and_reloads_into_an_img2img_pipeline(tiny_model, subject_dir, tmp_path,
                                                                               monkeypatch):
    model = tiny_model("sdxl-refiner")
    seen = capture_training_calls(monkeypatch)
    result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--max_train_steps", "6",
                                              "--learning_rate", "5e-3", "--data_aesthetic_score", "6.0"))
    unet = result["unet"]
    add_in = unet.add_embedding.linear_1.in_features
    for timesteps, cond in seen:
        assert (timesteps < 200).all()  # --refiner_training_strength 0.2 of 1000 timesteps
        assert cond["time_ids"].shape[1] == 5 and (cond["time_ids"][:, 4] == 6.0).all()
        # The add embedding takes the pooled text plus 5 embedded time ids (not the base model's 6).
        assert cond["text_embeds"].shape[1] + 5 * unet.config.addition_time_embed_dim == add_in
    inputs = unet_inputs(unet, "sdxl-refiner")
    trained = predict(unet, inputs)
    pipe = refiner_pipeline(model)
    base = predict(pipe.unet, inputs)
    assert (trained - base).abs().max() > 1e-4
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert torch.allclose(predict(pipe.unet, inputs), trained, atol=1e-5)


def test_refiner_strength_sets_the_timestep_range(tiny_model, subject_dir, tmp_path, monkeypatch):
    seen = capture_training_calls(monkeypatch)
    train_dreambooth.main(train_argv(tiny_model("sdxl-refiner"), subject_dir, tmp_path / "out", "--max_train_steps",
                                     "12", "--train_batch_size", "4", "--refiner_training_strength", "0.5"))
    drawn = torch.cat([timesteps for timesteps, _ in seen])
    assert drawn.max() < 500 and drawn.max() >= 200  # the whole low half, not only the default 0.2
    with pytest.raises(SystemExit, match="--refiner_training_strength must lie in"):
        train_dreambooth.main(train_argv(tiny_model("sdxl-refiner"), subject_dir, tmp_path / "x",
                                         "--refiner_training_strength", "0"))


def test_base_and_refiner_share_vae_caches_but_not_text_caches(tiny_model, subject_dir, tmp_path, capsys):
    def data(text_dir):
        return write_json(tmp_path / f"data-{os.path.basename(text_dir)}.json", [
            {"id": "subject", "instance_data_dir": subject_dir, "instance_prompt": "ohwx toy", "resolution": 64,
             "cache_dir_vae": str(tmp_path / "vae")},
            {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(text_dir)}])

    def run(model, data_config, name):
        return train_dreambooth.main(["--pretrained_model_name_or_path", model, "--data_backend_config", data_config,
                                      "--output_dir", str(tmp_path / name), "--max_train_steps", "1"])

    run(tiny_model("sdxl"), data(tmp_path / "text"), "base")
    capsys.readouterr()
    with pytest.raises(SystemExit, match="holds SDXL base model text embeddings .* each needs its own text cache"):
        run(tiny_model("sdxl-refiner"), data(tmp_path / "text"), "refiner")
    run(tiny_model("sdxl-refiner"), data(tmp_path / "text-refiner"), "refiner")
    out = capsys.readouterr().out
    assert "VAE cache: all 8 latents are up to date; nothing to encode" in out  # the base model's latents
    assert "text cache: encoding 1 of 1 captions" in out
    with pytest.raises(SystemExit, match="holds SDXL refiner text embeddings"):
        run(tiny_model("sdxl"), data(tmp_path / "text-refiner"), "base2")


def test_refiner_validation_refines_subject_images_and_evaluate_does_too(tiny_model, subject_dir, tmp_path, capsys):
    model = tiny_model("sdxl-refiner")
    out = tmp_path / "out"
    train_dreambooth.main(train_argv(model, subject_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                                     "--validation_prompt", "ignored", "--validation_steps", "2",
                                     "--num_validation_images", "2", "--validation_num_inference_steps", "10",
                                     "--eval_split", "2", "--eval_steps_interval", "1", prompt="ohwx toy"))
    assert "--validation_prompt is ignored: sdxl-refiner does not draw from a prompt alone; 2 subject image(s) are " \
        "refined at strength 0.2" in capsys.readouterr().out
    folder = out / "validation" / "step-2"
    assert Image.open(folder / "grid.png").size == (images.ROW_LABEL_WIDTH + 2 * 64, 2 * 64 + 14)  # source | refined
    assert open(folder / "prompts.txt").read().splitlines() == ["ohwx toy", "ohwx toy"]

    results = evaluate.main(["--pretrained_model_name_or_path", model, "--checkpoints", str(out), "--instance_data_dir",
                             subject_dir, "--instance_prompt", "ohwx toy", "--class_prompt", "toy", "--resolution",
                             "64", "--seed", "7", "--eval_split", "2", "--num_images_per_prompt", "2",
                             "--num_inference_steps", "10", "--clip_model", "none"])
    logged = {r["step"]: r for r in map(json.loads, open(out / "logs" / "train_log.jsonl")) if "eval_loss" in r}
    assert [r["name"] for r in results] == ["base", "checkpoint-1", "final"]
    assert all(r["eval_loss"] == logged[r["step"]]["eval_loss"] for r in results)
    assert all(int(t) < 200 for t in results[-1]["eval_loss_per_timestep"])  # the refiner's own range
    grid = Image.open(out / "evaluation" / "grids" / "final.png")
    # each row: the source, then its refinement, 64 px pictures drawn at 128; seed labels over the columns
    assert grid.size == (images.ROW_LABEL_WIDTH + 2 * 128, images.COLUMN_LABEL_HEIGHT + 2 * 128)


def test_too_few_validation_steps_for_the_refiners_strength_are_refused_before_training(tiny_model, subject_dir,
                                                                                        tmp_path):
    """img2img at strength 0.2 runs int(steps x 0.2) steps: 4 run none (diffusers would fail on an empty batch at the
    first validation), 5 run one."""
    argv = train_argv(tiny_model("sdxl-refiner"), subject_dir, tmp_path / "out", "--max_train_steps", "1",
                      "--validation_prompt", "ignored", "--validation_steps", "1", "--num_validation_images", "1")
    with pytest.raises(SystemExit, match="4 sampler steps at strength 0.2 run none: .* give at least 5"):
        train_dreambooth.main(argv + ["--validation_num_inference_steps", "4"])
    assert not os.path.exists(tmp_path / "out" / "logs")  # refused before training
    train_dreambooth.main(argv + ["--validation_num_inference_steps", "5"])
    assert os.path.isfile(tmp_path / "out" / "validation" / "step-1" / "grid.png")


def test_a_full_refiner_fine_tune_saves_an_img2img_pipeline(tiny_model, subject_dir, tmp_path):
    model = tiny_model("sdxl-refiner")
    result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--model_type", "full",
                                              "--max_train_steps", "2", "--learning_rate", "1e-4"))
    index = json.load(open(tmp_path / "out" / "model_index.json"))
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and index["requires_aesthetics_score"]
    pipe = refiner_pipeline(str(tmp_path / "out"))
    inputs = unet_inputs(pipe.unet, "sdxl-refiner")
    assert torch.allclose(predict(pipe.unet, inputs), predict(result["unet"], inputs), atol=1e-5)
