"""Security: no pickle is loaded from a model folder unless asked (--allow_pickle), be it the diffusion model, the
CLIPSeg of make_masks.py, the CLIP / DINO scorers or the preview VAE; a checkpoint's state files load with
weights_only, so a planted pickle is refused without running; whatever a data config says, outputs are written
inside --output_dir and the cache folders only."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import Server, model_info, train_argv, write_json
from safetensors.torch import load_file

from common import adapters, data, files, images, models, scores


def pickle_weights(folder):
    """Replace the .safetensors weights in `folder` by the same tensors as a pickle, as an old or untrusted upload
    has them (written by hand: transformers 5 saves safetensors whatever it is asked)."""
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            pickled = "pytorch_model.bin" if name == "model.safetensors" else name.replace(".safetensors", ".bin")
            torch.save(load_file(os.path.join(folder, name)), os.path.join(folder, pickled))
            os.remove(os.path.join(folder, name))


def pickle_only(model, tmp_path, part="unet"):
    """A copy of `model` whose `part` holds only a .bin (pickle) weights file."""
    import diffusers
    import transformers

    folder = tmp_path / "pickled"
    shutil.copytree(model, folder)
    library, class_name = files.read_json(os.path.join(folder, "model_index.json"))[part]
    module = diffusers if library == "diffusers" else transformers
    component = getattr(module, class_name).from_pretrained(str(folder), subfolder=part)
    pickle_weights(folder / part)
    return folder, component


@pytest.mark.parametrize("part", ["unet", "text_encoder"])
def test_a_model_folder_with_only_pickle_weights_is_refused_unless_allowed(tiny_model, tmp_path, part):
    folder, component = pickle_only(tiny_model("sd1"), tmp_path, part)
    with pytest.raises(SystemExit, match=rf"{part}/ has only pickle weights .*\.bin.*--allow_pickle"):
        model_info(folder)
    info = model_info(folder, allow_pickle=True)
    loaded = models.load_component(info, part)
    reference = dict(component.state_dict())
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())


def test_the_loader_itself_takes_safetensors_only_without_the_flag(tiny_model, tmp_path):
    """Even past the folder check (a model_index entry pointing at a pickled part), from_pretrained is told
    use_safetensors=True and fails rather than unpickle."""
    folder, _ = pickle_only(tiny_model("sd1"), tmp_path, "vae")
    info = model_info(tiny_model("sd1"))
    info.folder = str(folder)
    with pytest.raises(SystemExit, match="cannot load vae"):
        models.load_component(info, "vae")


# ---------------------------------------------------------------------------------------------------------------------
# The other models the scripts load (CLIPSeg, CLIP / DINO, the preview VAE) keep pickles out the same way


@pytest.fixture(scope="module")
def pickled(tiny_clipseg, tiny_scorers, tmp_path_factory):
    """{name: folder} of the tiny CLIPSeg, CLIP, DINO and Tiny AutoEncoder with pickle weights only, and
    "taesd_safe": the same Tiny AutoEncoder as safetensors."""
    from diffusers import AutoencoderTiny

    root = tmp_path_factory.mktemp("pickled")
    folders = {}
    for name, source in (("clipseg", tiny_clipseg), ("clip", tiny_scorers[0]), ("dino", tiny_scorers[1])):
        folders[name] = str(root / name)
        shutil.copytree(source, folders[name])
        pickle_weights(folders[name])
    torch.manual_seed(0)
    taesd = AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                            num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4)
    folders["taesd"], folders["taesd_safe"] = str(root / "taesd"), str(root / "taesd_safe")
    taesd.save_pretrained(folders["taesd"], safe_serialization=False)
    taesd.save_pretrained(folders["taesd_safe"])
    assert sorted(os.listdir(folders["taesd"])) == ["config.json", "diffusion_pytorch_model.bin"]
    assert "pytorch_model.bin" in os.listdir(folders["clip"]) and "model.safetensors" not in os.listdir(folders["clip"])
    return folders


def refusal(folder, pickle_file):
    """The message that refuses `folder`: it names the folder, its pickle and both ways out."""
    return rf"{re.escape(folder)}/ has only pickle weights \({re.escape(pickle_file)}\); loading a pickle can run " \
           r"code\. Convert it to safetensors .* or pass --allow_pickle"


def test_make_masks_refuses_a_pickle_only_clipseg_unless_allowed(tiny_clipseg, pickled, tmp_path):
    import make_demo
    import make_masks

    make_demo.make_subject_images(str(tmp_path / "in"), sizes=((64, 48), (48, 64)))

    def argv(model, out, *extra):
        return ["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / out), "--model", model,
                "--text_input", "toy", *extra]

    with pytest.raises(SystemExit, match=refusal(pickled["clipseg"], "pytorch_model.bin")):
        make_masks.main(argv(pickled["clipseg"], "refused"))
    assert not os.path.exists(tmp_path / "refused")

    # Allowed, the pickle holds the same weights as the safetensors model: the same masks, at a threshold (the
    # mean probability) that leaves them partial, so they show what the model sees.
    segmenter = make_masks.load_segmenter(make_masks.parse_args(argv(tiny_clipseg, "unused")))
    image = images.load_image(str(tmp_path / "in" / "subject_00.png"))
    threshold = str(float(make_masks.segment([image], ["toy"], *segmenter, "cpu")[0].mean()))
    assert make_masks.main(argv(pickled["clipseg"], "allowed", "--threshold", threshold, "--allow_pickle")) == 2
    assert make_masks.main(argv(tiny_clipseg, "safe", "--threshold", threshold)) == 2
    for name in ("subject_00.png", "subject_01.png"):
        allowed, safe = (np.asarray(images.load_mask(str(tmp_path / out / name))) for out in ("allowed", "safe"))
        assert np.array_equal(allowed, safe) and 0 < allowed.mean() < 255


def test_rare_tokens_refuses_a_pickle_only_clip_unless_allowed(tiny_scorers, pickled, subject_dir, tmp_path):
    import rare_tokens

    names = tmp_path / "names.txt"
    names.write_text("red toy\nblue dog\nshape\n")
    argv = ["--images", subject_dir, "--names", str(names), "--clip_model"]
    with pytest.raises(SystemExit, match=refusal(pickled["clip"], "pytorch_model.bin")):
        rare_tokens.main(argv + [pickled["clip"]])
    allowed = rare_tokens.main(argv + [pickled["clip"], "--allow_pickle"])
    safe = rare_tokens.main(argv + [tiny_scorers[0]])
    assert [name for name, _ in allowed] == [name for name, _ in safe]
    assert [value for _, value in allowed] == pytest.approx([value for _, value in safe], abs=1e-6)
    assert len({round(value, 4) for _, value in allowed}) == 3


@pytest.fixture(scope="module")
def reference_run(tiny_model, pickled, tmp_path_factory):
    """One training step from the safetensors tiny model, with a validation image previewed through the Tiny
    AutoEncoder: (output folder, its LoRA tensors, the preview pictures the webhook received)."""
    return preview_run(tiny_model("sd1"), pickled["taesd_safe"], tmp_path_factory.mktemp("reference"))


def preview_run(model, taesd, folder, *extra):
    import make_demo
    import train_dreambooth

    server = Server()
    try:
        config = write_json(folder / "hooks.json", {"webhook_type": "raw", "callback_url": server.url})
        result = train_dreambooth.main(train_argv(
            model, make_demo.make_subject_images(str(folder / "subject")), folder / "out", "--max_train_steps", "1",
            "--validation_prompt", "a photo of ohwx toy", "--validation_steps", "1", "--num_validation_images", "1",
            "--validation_num_inference_steps", "2", "--validation_preview", "--validation_preview_steps", "1",
            "--preview_vae", taesd, "--webhook_config", config, *extra))
    finally:
        server.stop()
    events = [json.loads(request["body"]) for request in server.requests]
    assert result["steps"] == 1
    return (folder / "out", load_file(str(folder / "out" / adapters.LORA_WEIGHTS_NAME)),
            [event["images"][0] for event in events if event["type"] == "preview_image"])


def test_with_allow_pickle_pickle_only_weights_train_and_preview_as_their_safetensors_do(tiny_model, pickled,
                                                                                        reference_run, tmp_path):
    """A model folder whose unet has only a .bin, and a pickle-only preview VAE: with --allow_pickle the run
    loads both, and the step and the previews equal those of the same weights as safetensors."""
    folder, _ = pickle_only(tiny_model("sd1"), tmp_path, "unet")
    _, lora, previews = preview_run(str(folder), pickled["taesd"], tmp_path, "--allow_pickle")
    _, reference_lora, reference_previews = reference_run
    assert lora.keys() == reference_lora.keys()
    assert all(torch.equal(lora[key], reference_lora[key]) for key in lora)
    assert any(key.endswith("lora.up.weight") and lora[key].abs().sum() > 0 for key in lora)  # the step trained
    assert len(previews) == 2 and previews == reference_previews


@pytest.mark.parametrize("what", ["model", "preview_vae", "clip_model"])
def test_training_refuses_pickle_only_weights_before_writing_anything(tiny_model, pickled, subject_dir, tmp_path,
                                                                      what):
    import train_dreambooth

    out = tmp_path / "out"
    model = tiny_model("sd1")
    extra = ["--validation_prompt", "a photo of ohwx toy"]
    if what == "model":
        model = str(pickle_only(model, tmp_path, "unet")[0])
        message = rf"{re.escape(model)}: unet/ has only pickle weights \(diffusion_pytorch_model\.bin\)"
    elif what == "preview_vae":
        hooks = write_json(tmp_path / "hooks.json", {"webhook_type": "raw", "callback_url": "http://127.0.0.1:9"})
        extra += ["--validation_preview", "--preview_vae", pickled["taesd"], "--webhook_config", hooks]
        message = refusal(pickled["taesd"], "diffusion_pytorch_model.bin")
    else:
        extra += ["--evaluation_type", "clip", "--clip_model", pickled["clip"]]
        message = refusal(pickled["clip"], "pytorch_model.bin")
    with pytest.raises(SystemExit, match=message):
        train_dreambooth.main(train_argv(model, subject_dir, out, *extra))
    assert not os.path.exists(out)


def test_evaluate_refuses_pickle_only_scorers_unless_allowed(tiny_model, tiny_scorers, pickled, reference_run,
                                                             tmp_path):
    import evaluate

    trained = reference_run[0]
    before = tree(trained)
    argv = ["--pretrained_model_name_or_path", tiny_model("sd1"), "--checkpoints", str(trained),
            "--instance_data_dir", str(trained.parent / "subject"), "--instance_prompt", "ohwx toy",
            "--class_prompt", "toy", "--resolution", "64", "--validation_prompt", "a photo of {instance}",
            "--num_images_per_prompt", "1", "--num_inference_steps", "2", "--evaluation_dir", str(tmp_path / "eval")]
    clip, dino = tiny_scorers
    for scorers, refused in (((pickled["clip"], dino), "clip"), ((clip, pickled["dino"]), "dino")):
        with pytest.raises(SystemExit, match=refusal(pickled[refused], "pytorch_model.bin")):
            evaluate.main(argv + ["--clip_model", scorers[0], "--dino_model", scorers[1]])
        assert not os.path.exists(tmp_path / "eval") and tree(trained) == before

    results = evaluate.main(argv + ["--clip_model", pickled["clip"], "--dino_model", pickled["dino"],
                                    "--allow_pickle"])
    assert [r["name"] for r in results] == ["base", "final"]
    scorer = scores.Scorer(clip, dino)  # the same weights as safetensors score the saved images alike
    real = [images.load_image(path) for path in sorted(data.find_images(str(trained.parent / "subject"))[0])]
    for r in results:
        image = images.load_image(str(tmp_path / "eval" / "images" / r["name"] / "p00-seed0.png"))
        expected = scorer.scores([image], ["a photo of toy"], scorer.clip_images(real), scorer.dino_images(real))
        assert {key: r[key] for key in expected} == pytest.approx(expected, abs=1e-5)


class Planted:
    """Unpickling this creates a file: what a malicious pickle would do with any code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_0.pt"])
def test_a_tampered_checkpoint_state_file_is_refused_without_running_it(tiny_model, subject_dir, tmp_path, name):
    import train_dreambooth
    from conftest import train_argv

    out = tmp_path / "out"
    argv = train_argv(tiny_model("sd1"), subject_dir, out, "--checkpointing_steps", "1", "--max_train_steps", "2")
    train_dreambooth.main(argv)
    marker = tmp_path / "code_ran"
    torch.save({"state": Planted(str(marker))}, str(out / "checkpoint-1" / name))
    shutil.rmtree(out / "checkpoint-2", ignore_errors=True)
    with pytest.raises(SystemExit, match=rf"checkpoint-1/{name}: not a training state file"):
        train_dreambooth.main(argv + ["--resume_from_checkpoint", str(out / "checkpoint-1")])
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Outputs stay where they belong


def tree(folder):
    """Every file and folder under `folder`, as relative paths."""
    return {os.path.relpath(os.path.join(root, name), folder)
            for root, dirs, files in os.walk(folder) for name in dirs + files}


def test_hostile_dataset_ids_and_prompts_write_nothing_outside_the_output_folder(tiny_model, subject_dir, tmp_path):
    """Dataset ids name cache folders and prompts name nothing: ids shaped like paths (parent steps, absolute
    paths) and a prompt full of them leave every file of the run under --output_dir."""
    import train_dreambooth
    from conftest import write_json

    model = tiny_model("sd1")
    work = tmp_path / "work"
    out = work / "out"  # caches default to out/cache, so one folder holds everything the run writes
    ids = ["../../../../escaped", "/tmp/absolute-id", "sub/../../../up", "..", "~"]
    data = write_json(tmp_path / "data.json", [
        {"id": name, "instance_data_dir": subject_dir, "instance_prompt": "a photo of ohwx toy ../../../x",
         "resolution": 64} for name in ids] + [{"id": "../text", "dataset_type": "text_embeds", "default": True}])
    before = {"here": tree(tmp_path), "parent": set(os.listdir(tmp_path.parent)),
              "home": set(os.listdir(os.path.expanduser("~")))}
    assert not os.path.exists("/tmp/absolute-id")
    train_dreambooth.main(["--pretrained_model_name_or_path", model, "--data_backend_config", data,
                           "--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "1",
                           "--train_batch_size", "1", "--validation_prompt", "../../../../v {instance}",
                           "--validation_instance", "../../ohwx", "--validation_steps", "1",
                           "--num_validation_images", "1", "--seed", "0"])
    vae_folders = sorted(os.listdir(out / "cache" / "vae"))
    assert len(vae_folders) == len(ids) and all("/" not in name and name not in (".", "..") for name in vae_folders)
    new = tree(tmp_path) - before["here"]
    assert new and all(p == "work" or p.startswith(os.path.join("work", "out")) for p in new)
    assert any(p.endswith(".safetensors") for p in new) and any(p.endswith(".png") for p in new)
    assert set(os.listdir(tmp_path.parent)) == before["parent"]
    assert set(os.listdir(os.path.expanduser("~"))) == before["home"]
    assert not os.path.exists("/tmp/absolute-id")


def test_a_symlink_planted_in_the_cache_cannot_lead_latents_out_of_it(tiny_model, tmp_path):
    import cache_latents
    import make_demo

    data = tmp_path / "data"
    make_demo.make_subject_images(str(data / "sub"), sizes=((64, 64),) * 2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache = tmp_path / "out" / "cache" / "vae" / "instance"
    cache.mkdir(parents=True)
    os.symlink(elsewhere, cache / "sub")  # out/cache/vae/instance/sub -> elsewhere
    argv = ["--pretrained_model_name_or_path", tiny_model("sd1"), "--instance_data_dir", str(data),
            "--instance_prompt", "ohwx", "--output_dir", str(tmp_path / "out"), "--resolution", "64"]
    with pytest.raises(SystemExit, match=rf"{cache}/sub/.*\.safetensors resolves to {elsewhere}/.*, outside {cache}"):
        cache_latents.main(argv)
    assert os.listdir(elsewhere) == []
    os.remove(cache / "sub")  # without the link the same command caches normally
    plans = cache_latents.main(argv)
    assert all(os.path.isfile(e.cache_path) and files.inside(e.cache_path, cache) for e in plans["instance"])


def test_make_masks_writes_no_mask_through_a_planted_symlink(tmp_path):
    import make_masks
    from PIL import Image

    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.new("RGBA", (16, 16), (255, 0, 0, 255)).save(tmp_path / "in" / "sub" / "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "sub")
    with pytest.raises(SystemExit, match="resolves to .*elsewhere/a.png, outside"):
        make_masks.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                         "--method", "alpha"])
    assert os.listdir(tmp_path / "elsewhere") == []


@pytest.mark.parametrize("where", ["output_dir", "cache_dir_vae", "text_cache"])
def test_outputs_inside_a_data_folder_are_refused_before_any_model_work(subject_dir, tmp_path, where):
    """Validation pictures written among the subject's photos would be trained on as the subject next time."""
    import train_dreambooth
    from conftest import write_json

    inner = os.path.join(subject_dir, "outputs")
    entries = [{"id": "subject", "instance_data_dir": subject_dir, "instance_prompt": "ohwx",
                **({"cache_dir_vae": inner} if where == "cache_dir_vae" else {})}]
    if where == "text_cache":
        entries.append({"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": inner})
    data = write_json(tmp_path / "data.json", entries)
    output = inner if where == "output_dir" else str(tmp_path / "out")
    with pytest.raises(SystemExit, match=rf"\(({inner}|{inner}/cache/text)\) lies inside the images of dataset "
                                         "'subject'"):
        train_dreambooth.main(["--pretrained_model_name_or_path", str(tmp_path / "no-model-needed"),
                               "--data_backend_config", data, "--output_dir", output])
    assert not os.path.exists(inner)
