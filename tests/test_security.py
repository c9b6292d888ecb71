"""Security: no pickle is loaded from a model folder unless asked (--allow_pickle); a checkpoint's state files load
with weights_only, so a planted pickle is refused without running."""

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
