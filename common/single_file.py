"""Single-file checkpoints: an original-format (LDM / A1111, BFL) .safetensors file converted once to a diffusers
folder with diffusers' from_single_file (models.resolve_model then loads the folder like any other). Which family a
file holds, and how its file converts, each family says (common/families/).
"""

import os
import shutil

import torch

from common import families, files


def convert_single_file(path, args, cache_root):
    """Load a single-file checkpoint with diffusers' from_single_file once and keep it as a diffusers folder.

    Later runs (and caching) then load the folder directly; the folder name carries the file's fingerprint, so an
    edited checkpoint is converted again."""
    if not path.endswith(".safetensors"):
        raise SystemExit(f"{path}: only .safetensors single-file checkpoints are loaded (a .ckpt file is a pickle "
                         "that can run code); convert it to safetensors first")
    family = families.detect_single_file(path)
    folder = os.path.join(cache_root, "converted",
                          f"{files.safe_folder_name(os.path.basename(path))}-{files.sampled_digest(path)[:12]}")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    print(f"converting single-file checkpoint {path} ({family.family}) to a diffusers folder in {folder}")
    try:
        pipe = family.from_single_file(path, args)
    except SystemExit:
        raise
    except Exception as err:  # diffusers raises many kinds here; all mean the same to the user
        raise SystemExit(f"{path}: from_single_file failed ({err}). Offline, pass --single_file_config with a diffusers "
                         "folder (or cached hub id) of the same architecture.") from None
    unloaded = [f"{name}.{key}" for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)
                for key, value in part.state_dict().items() if value.device.type == "meta"]
    if unloaded:  # diffusers leaves weights it found no tensor for uninitialised instead of failing
        raise SystemExit(f"{path}: from_single_file left {len(unloaded)} weights unloaded (e.g. {unloaded[0]}); the "
                         "checkpoint does not match the architecture of --single_file_config")
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
