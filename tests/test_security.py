"""Security: no pickle is loaded from a model folder unless asked (--allow_pickle); a checkpoint's state files load
with weights_only, so a planted pickle is refused without running; whatever a data config says, outputs are
written inside --output_dir and the cache folders only."""

import os
import shutil

import pytest
import torch
from conftest import model_info
from safetensors.torch import load_file

import common


def pickle_only(model, tmp_path, part="unet"):
    """A copy of `model` whose `part` holds only a .bin (pickle) weights file."""
    import diffusers
    import transformers

    folder = tmp_path / "pickled"
    shutil.copytree(model, folder)
    library, class_name = common.read_json(os.path.join(folder, "model_index.json"))[part]
    module = diffusers if library == "diffusers" else transformers
    component = getattr(module, class_name).from_pretrained(str(folder), subfolder=part)
    for name in os.listdir(folder / part):  # the same weights as a pickle, as an old or untrusted upload has them
        if name.endswith(".safetensors"):
            pickled = "diffusion_pytorch_model.bin" if library == "diffusers" else "pytorch_model.bin"
            torch.save(load_file(str(folder / part / name)), str(folder / part / pickled))
            os.remove(folder / part / name)
    return folder, component


@pytest.mark.parametrize("part", ["unet", "text_encoder"])
def test_a_model_folder_with_only_pickle_weights_is_refused_unless_allowed(tiny_model, tmp_path, part):
    folder, component = pickle_only(tiny_model("sd1"), tmp_path, part)
    with pytest.raises(SystemExit, match=rf"{part}/ has only pickle weights .*\.bin.*--allow_pickle"):
        model_info(folder)
    info = model_info(folder, allow_pickle=True)
    loaded = common.load_component(info, part)
    reference = dict(component.state_dict())
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())


def test_the_loader_itself_takes_safetensors_only_without_the_flag(tiny_model, tmp_path):
    """Even past the folder check (a model_index entry pointing at a pickled part), from_pretrained is told
    use_safetensors=True and fails rather than unpickle."""
    folder, _ = pickle_only(tiny_model("sd1"), tmp_path, "vae")
    info = model_info(tiny_model("sd1"))
    info.folder = str(folder)
    with pytest.raises(SystemExit, match="cannot load vae"):
        common.load_component(info, "vae")


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
    assert all(os.path.isfile(e.cache_path) and common.inside(e.cache_path, cache) for e in plans["instance"])


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
