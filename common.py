"""What several DreamBooth scripts share: config parsing, datasets, buckets, model loading, text encoding, caches.

Nothing here runs on its own. The scripts that use it:

    cache_latents.py     VAE latents + text embeddings to disk
    train_dreambooth.py  the training run (builds missing caches with the same functions)

Sections, in the order a run needs them:
    1. small helpers (atomic writes, fingerprints)
    2. command-line flags and --config FILE.json
    3. the data backend config (one JSON list of datasets)
    4. images: discovery, decoding, captions
    5. aspect buckets and crops
    6. models: loading and family detection
    7. text encoding and SDXL time ids, exactly as the diffusers pipelines compute them
    8. caches: VAE latents and text embeddings (safetensors, fingerprinted, written atomically)
"""

import argparse
import contextlib
import ctypes
import difflib
import errno
import functools
import gc
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# PIL refuses above 2x its MAX_IMAGE_PIXELS (~179 MP). We check the header against the same number *before*
# decoding, so a decompression bomb costs a few bytes of reading, not gigabytes of memory.
MAX_IMAGE_PIXELS = 2 * 89_478_485
MIN_IMAGE_EDGE = 16  # below this an image holds no usable detail at any bucket size
CACHE_FORMAT_VERSION = "1"
# Bump when encode_prompt changes what it computes, so old text caches are recomputed rather than trusted.
TEXT_ENCODING_VERSION = "1"
EXIF_ORIENTATION = 0x0112
PRECISIONS = ("no_change", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "fp8-torchao", "nf4-bnb")

# bitsandbytes (imported by peft) warns on every CPU start that an optional kernel package is missing; it changes
# nothing for training, so it is kept out of the way of messages that matter.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# transformers says, once per image-processor class diffusers imports, that torchvision is missing; this project
# does all image work with PIL and deliberately has no torchvision.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Small helpers


def closest(name, choices):
    """The known name most like `name`, for 'did you mean' messages."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.0)
    return match[0] if match else None


def str2bool(value):
    """argparse type for booleans written as true/false (also yes/no, 1/0), as config.json writes them."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def fault_point(name):
    """A place where a fault test may kill this process: with DREAMBOOTH_KILL_AT="NAME:N" in the environment the
    N-th arrival at point NAME sends SIGKILL to the process itself (no cleanup runs, as after a power cut).
    Points: "write" (a finished temporary file, not yet renamed into place), "backward" (a training step's
    gradients computed, the weights not yet updated), "step" (a training step done and logged).
    With DREAMBOOTH_FAULT_LOG=FILE every arrival is appended there, so a test can choose where to kill."""
    if os.environ.get("DREAMBOOTH_FAULT_LOG"):
        with open(os.environ["DREAMBOOTH_FAULT_LOG"], "a", encoding="utf-8") as handle:
            handle.write(name + "\n")
    wanted = os.environ.get("DREAMBOOTH_KILL_AT")
    if not wanted or wanted.rsplit(":", 1)[0] != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(wanted.rsplit(":", 1)[1]):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_COUNTS = {}


def fsync_replace(tmp_path, final_path):
    """Flush a finished temporary file to disk and rename it into place: readers see all of it or nothing."""
    with open(tmp_path, "rb") as handle:
        os.fsync(handle.fileno())
    fault_point("write")
    os.replace(tmp_path, final_path)


def tmp_name(path):
    """Where `path` is written before it is renamed into place: .tmpPID/NAME, in a hidden folder of this process
    beside it. safetensors writes through a temporary file of its own (.tmpXXXXXX beside its target), so that one
    lands in our folder too, and whatever a killed run leaves is found, with its process id, in one place."""
    return os.path.join(os.path.dirname(path), f".tmp{os.getpid()}", os.path.basename(path))


def disk_full(err):
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


class DiskFull(SystemExit):
    """A write that ran out of space: the message names the file; `path` is that file (a caller writing a folder
    of files, such as a checkpoint, can say which folder)."""

    def __init__(self, message, path):
        super().__init__(message)
        self.path = path


@contextlib.contextmanager
def atomic_file(path):
    """Yields a temporary name to write `path` to; afterwards it is flushed and renamed into place, or, if writing
    failed, removed (the previous `path`, if any, is untouched). A full disk is a SystemExit naming the file."""
    tmp = tmp_name(path)
    try:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        yield tmp
        fsync_replace(tmp, path)
    except OSError as err:
        if disk_full(err):
            raise DiskFull(f"{path}: the disk is full ({err.strerror}); nothing half-written was kept. Free some "
                           "space (or point the output / cache folders elsewhere) and run the same command again: "
                           "it goes on from what is finished.", path) from None
        raise
    finally:
        shutil.rmtree(os.path.dirname(tmp), ignore_errors=True)  # what is left in it was never renamed into place


def save_safetensors_atomic(tensors, path, metadata=None):
    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def save_image_atomic(image, path):
    """Save a PIL image (format from the extension) so that a killed run never leaves a half-written file."""
    with atomic_file(path) as tmp:
        image.save(tmp, format=Image.registered_extensions()[os.path.splitext(path)[1].lower()])


def contact_sheet(images, labels, path, thumb=160):
    """One PNG showing many images at a glance: thumbnails in a near-square grid, each with a label below.
    `images` may be a generator (one image in memory at a time); there is one label per image."""
    from PIL import ImageDraw

    columns = max(1, math.ceil(math.sqrt(len(labels))))
    rows = math.ceil(len(labels) / columns)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [wrap_label(measure, label, thumb - 4) for label in labels]
    line_height = 12
    label_height = 2 + line_height * max((len(lines) for lines in wrapped), default=1)
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        image = image.convert("RGB")
        image.thumbnail((thumb, thumb))
        x, y = (i % columns) * thumb, (i // columns) * (thumb + label_height)
        sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        for n, line in enumerate(lines):
            draw.text((x + 2, y + thumb + 1 + n * line_height), line, fill="black")
    save_image_atomic(sheet, path)


def wrap_label(draw, label, width, max_lines=3):
    """`label` broken at spaces into lines no wider than `width` pixels (at most `max_lines`; a word too long for
    a line, or text beyond the last line, is cut and ends in '..')."""
    lines, words = [], str(label).split(" ")
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}") <= width:
            line += " " + words.pop(0)
        if draw.textlength(line) > width or (words and len(lines) == max_lines - 1):
            while line and draw.textlength(line + "..") > width:
                line = line[:-1]
            line += ".."
        lines.append(line)
    return lines or [""]


def write_text_atomic(text, path):
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)


STATE_FILE = "training_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first. A folder without its state file (a broken copy) is skipped, loudly."""
    found = []
    if not os.path.isdir(output_dir):
        return found
    for name in os.listdir(output_dir):
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
            path = os.path.join(output_dir, name)
            if os.path.isfile(os.path.join(path, STATE_FILE)):
                found.append((int(name[len("checkpoint-"):]), path))
            else:
                print(f"warning: {path} is incomplete (no {STATE_FILE}); it is ignored")
    return [path for _, path in sorted(found)]


def read_log(path, until_step=None):
    """The records of a train_log.jsonl (up to `until_step`), without a last line a killed run left unfinished."""
    records = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # cut off by a kill mid-write
                if until_step is None or record["step"] <= until_step:
                    records.append(record)
    return records


def write_json_atomic(obj, path):
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)


def remove_stale_temporaries(folder):
    """Delete the temporaries a killed run left behind: file folders (.tmpPID/, see tmp_name) and checkpoint or
    pipeline folders (.NAME.tmp/). They were never renamed into place, so never trusted. The temporaries of a
    process still running are left alone."""
    if not os.path.isdir(folder):
        return
    for root, dirs, _ in os.walk(folder):
        for name in list(dirs):
            found = re.fullmatch(r"\.tmp(\d+)", name)
            if (found and not process_alive(int(found.group(1)))) or (name.startswith(".") and name.endswith(".tmp")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                dirs.remove(name)


def process_alive(pid):
    if pid == os.getpid():
        return False  # ours are never left over from an earlier write
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sampled_digest(path, samples=16, block=1 << 16):
    """A cheap fingerprint of a large weights file: its size plus 16 blocks spread through it.

    A fine-tune changes nearly every byte, so two different checkpoints of one architecture never collide,
    yet fingerprinting a 5 GB text encoder reads 1 MB instead of 5 GB."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        for i in range(samples):
            handle.seek(max(0, (size - block) * i // max(1, samples - 1)))
            digest.update(handle.read(block))
    return digest.hexdigest()


def file_fingerprint(path):
    """What identifies an image's content for the cache: size, modification time and content hash."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}


def read_json(path, flag=None):
    """A JSON file, or a SystemExit that names the file (and the flag that named it) and what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise SystemExit(f"{flag + ' ' if flag else ''}{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise SystemExit(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------------------------------
# 2. Command-line flags and --config FILE.json


def option_names(parser):
    """Every long flag name of a parser, without the leading dashes."""
    return {opt[2:] for action in parser._actions for opt in action.option_strings if opt.startswith("--")}


def config_value(action, key, value, source):
    """Convert one config.json value with the flag's own type and choices, so a file and a command line agree."""

    def convert(item):
        if item is None or action.type is None:
            return item
        try:  # JSON numbers arrive as numbers; the flag's type gets the text a command line would give it
            return str2bool(item) if action.type is str2bool else action.type(str(item))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
            raise SystemExit(f"{source}: '{key}' has a bad value {item!r}: {err}") from None

    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        converted = [convert(item) for item in items]
    elif isinstance(value, list):
        raise SystemExit(f"{source}: '{key}' takes one value, got a list {value!r}")
    else:
        converted = convert(value)
    allowed = action.choices
    for item in converted if isinstance(converted, list) else [converted]:
        if allowed is not None and item is not None and item not in allowed:
            raise SystemExit(f"{source}: '{key}' must be one of {', '.join(map(str, allowed))}; got {item!r}")
    return converted


def read_config_file(path, parser, also_known=()):
    """Values from a config.json for this parser: keys are flag names with or without the leading '--'.

    `also_known` names keys that belong to a sibling script (cache_latents.py reads the training config and
    ignores the training-only keys); anything else unknown is an error that suggests the closest flag."""
    raw = read_json(path, "--config")
    if not isinstance(raw, dict):
        raise SystemExit(f"{path}: a config file holds one JSON object of flag names and values")
    actions = {opt[2:]: action for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    values = {}
    for key, value in raw.items():
        name = key.lstrip("-")
        if name == "config":
            continue
        if name not in actions:
            if name in also_known:
                continue
            hint = closest(name, list(actions) + list(also_known))
            raise SystemExit(f"{path}: unknown key '{key}'" + (f"; did you mean '{hint}'?" if hint else ""))
        values[actions[name].dest] = config_value(actions[name], key, value, path)
    return values


def parse_args_with_config(parser, argv=None, also_known=()):
    """parser.parse_args, with --config FILE.json supplying defaults: the command line wins over the file."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_config_file(known.config, parser, also_known))
    return parser.parse_args(argv)


def add_model_args(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", help="diffusers folder, hub id, or a single .safetensors file")
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    group.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)")
    group.add_argument("--local_files_only", type=str2bool, nargs="?", const=True, default=False,
                       help="never contact the hub; use the local hub cache only")
    group.add_argument("--single_file_config", default=None,
                       help="for a single-file checkpoint: a diffusers folder or hub id holding its component configs")
    add_allow_pickle_arg(group)
    for i in (1, 2, 3):
        group.add_argument(f"--text_encoder_{i}_precision", default="no_change", choices=PRECISIONS,
                           help=f"quantise text encoder {i} (for caching and validation images)")


def add_allow_pickle_arg(parser):
    """--allow_pickle, for every script that loads model weights (see safe_weights)."""
    parser.add_argument("--allow_pickle", type=str2bool, nargs="?", const=True, default=False,
                        help="load a model whose weights are only pickles (.bin/.pt: loading one can run code); "
                             "only for a source you trust")


def add_data_args(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--config", default=None, help="JSON file of flag values (keys with or without '--')")
    group.add_argument("--data_backend_config", "--data_config", default=None,
                       help="JSON list of datasets (multidatabackend.json)")
    group.add_argument("--instance_data_dir", default=None, help="simple case: one folder of subject images")
    group.add_argument("--instance_prompt", default=None, help="simple case: the caption of every subject image")
    group.add_argument("--resolution", type=float, default=None,
                       help="default dataset resolution (default: the model's native size)")
    group.add_argument("--resolution_type", default="pixel_area", choices=["pixel", "area", "pixel_area"])
    group.add_argument("--output_dir", default="output")
    group.add_argument("--cache_dir", default=None, help="root of the caches (default: OUTPUT_DIR/cache)")
    group.add_argument("--seed", type=int, default=None, help="makes a run reproducible (random crops included)")
    group.add_argument("--vae_batch_size", type=int, default=4, help="images per VAE encode when caching")


# ---------------------------------------------------------------------------------------------------------------------
# 3. The data backend config


# key: (type, allowed values or None). Types: "str", "bool", "int", "number", "str_or_list".
DATASET_KEYS = {
    "id": ("str", None),
    "type": ("str", ("local",)),
    "dataset_type": ("str", ("image", "conditioning", "text_embeds", "eval")),
    "instance_data_dir": ("str", None),
    "caption_strategy": ("str", ("instanceprompt", "textfile", "filename")),
    "instance_prompt": ("str_or_list", None),
    "resolution": ("number", None),
    "resolution_type": ("str", ("pixel", "area", "pixel_area")),
    "minimum_image_size": ("number", None),
    "maximum_image_size": ("number", None),
    "target_downsample_size": ("number", None),
    "crop": ("bool", None),
    "crop_style": ("str", ("center", "centre", "corner", "random")),
    "crop_aspect": ("str", ("square", "preserve")),
    "repeats": ("int", None),
    "probability": ("number", None),
    "is_regularisation_data": ("bool", None),
    "is_regularization_data": ("bool", None),
    "conditioning_data": ("str_or_list", None),
    "conditioning_type": ("str", ("mask",)),
    "cache_dir_vae": ("str", None),
    "cache_dir": ("str", None),
    "default": ("bool", None),
    "metadata_backend": ("str", ("discovery",)),
}


@dataclass
class Dataset:
    """One entry of the data backend config, validated and with its defaults filled in."""

    id: str
    type: str = "local"
    dataset_type: str = "image"
    instance_data_dir: str = None
    caption_strategy: str = None
    instance_prompt: object = None  # a string, or a list to pick from at random per sample
    resolution: float = None
    resolution_type: str = None
    minimum_image_size: float = None
    maximum_image_size: float = None
    target_downsample_size: float = None
    crop: bool = False
    crop_style: str = "center"
    crop_aspect: str = "square"
    repeats: int = 0
    probability: float = 1.0
    is_regularisation_data: bool = False
    conditioning_data: object = None
    conditioning_type: str = None
    cache_dir_vae: str = None
    cache_dir: str = None
    default: bool = False
    metadata_backend: str = "discovery"

    @property
    def trains(self):
        """Images of this dataset are trained on (eval sets are held out; masks and text caches are not images)."""
        return self.dataset_type == "image"


def type_ok(value, kind):
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str_or_list":
        return isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
    raise AssertionError(kind)


TYPE_WORDS = {"str": "a string", "bool": "true or false", "int": "a whole number", "number": "a number",
              "str_or_list": "a string or a list of strings"}


def safe_folder_name(text):
    """`text` as one folder name: no separators or parent steps. A name that had to change gets a hash of the
    original, so two ids that clean up alike ("..", "~") still get folders of their own."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")
    return name if name == text else f"{name or 'dataset'}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def validate_dataset(raw, index, source):
    where = f"{source}, dataset {raw.get('id', f'#{index + 1}')!r}" if isinstance(raw, dict) else f"{source}, entry #{index + 1}"
    if not isinstance(raw, dict):
        raise SystemExit(f"{where}: each dataset is a JSON object, got {type(raw).__name__}")
    if "id" not in raw:
        raise SystemExit(f"{where}: every dataset needs an 'id'")
    for key, value in raw.items():
        if key not in DATASET_KEYS:
            raise SystemExit(f"{where}: unknown key '{key}'; did you mean '{closest(key, DATASET_KEYS)}'?")
        kind, allowed = DATASET_KEYS[key]
        if value is None and key != "id":
            continue
        if not type_ok(value, kind):
            raise SystemExit(f"{where}: '{key}' must be {TYPE_WORDS[kind]}, got {json.dumps(value)}")
        if allowed is not None and value not in allowed:
            raise SystemExit(f"{where}: '{key}' must be one of {', '.join(allowed)}; got {value!r}")
    values = {k: v for k, v in raw.items() if v is not None}
    if "is_regularization_data" in values:  # the US spelling is the same switch
        values["is_regularisation_data"] = values.pop("is_regularization_data") or values.get("is_regularisation_data", False)
    if values.get("crop_style") == "centre":
        values["crop_style"] = "center"
    dataset = Dataset(**values)
    if dataset.repeats < 0:
        raise SystemExit(f"{where}: 'repeats' must be 0 or more (0 = each image once per epoch)")
    if dataset.probability <= 0:
        raise SystemExit(f"{where}: 'probability' must be above 0")
    if dataset.resolution is not None and dataset.resolution <= 0:
        raise SystemExit(f"{where}: 'resolution' must be above 0")
    if dataset.dataset_type != "text_embeds":
        if not dataset.instance_data_dir:
            raise SystemExit(f"{where}: needs 'instance_data_dir', the folder of its images")
        if not os.path.isdir(dataset.instance_data_dir):
            raise SystemExit(f"{where}: instance_data_dir {dataset.instance_data_dir!r} is not a folder; fix the path")
    if dataset.dataset_type in ("image", "eval"):
        if dataset.caption_strategy is None:
            dataset.caption_strategy = "instanceprompt" if dataset.instance_prompt is not None else "filename"
        if dataset.caption_strategy == "instanceprompt" and dataset.instance_prompt is None:
            raise SystemExit(f"{where}: caption_strategy 'instanceprompt' needs 'instance_prompt'")
    return dataset


def load_datasets(args):
    """The datasets of --data_backend_config, or the one --instance_data_dir describes, with defaults filled.

    Runs before any model work, so a typo in the data config costs a second, not a model load."""
    if args.data_backend_config:
        source = args.data_backend_config
        raw = read_json(source, "--data_backend_config")
        if not isinstance(raw, list):
            raise SystemExit(f"{source}: the data backend config is a JSON list of dataset objects")
    elif args.instance_data_dir:
        source = "--instance_data_dir"
        raw = [{"id": "instance", "instance_data_dir": args.instance_data_dir, "instance_prompt": args.instance_prompt}]
    else:
        raise SystemExit("no data: give --data_backend_config FILE.json, or --instance_data_dir DIR --instance_prompt TEXT")

    datasets = [validate_dataset(entry, i, source) for i, entry in enumerate(raw)]
    seen = {}
    for dataset in datasets:
        if dataset.id in seen:
            raise SystemExit(f"{source}: two datasets have the id {dataset.id!r}; every id must be unique")
        seen[dataset.id] = dataset
    if not any(d.trains for d in datasets):
        raise SystemExit(f"{source}: no image dataset to train on (dataset_type 'image', the default)")
    defaults = [d for d in datasets if d.dataset_type == "text_embeds" and d.default]
    if len(defaults) > 1:
        raise SystemExit(f"{source}: more than one text_embeds dataset has \"default\": true")
    for dataset in datasets:
        if dataset.dataset_type == "conditioning" and dataset.conditioning_type != "mask":
            raise SystemExit(f"{source}, dataset {dataset.id!r}: a conditioning dataset needs "
                             "\"conditioning_type\": \"mask\" (masks are the only conditioning this trainer uses)")
        for linked in as_list(dataset.conditioning_data):
            if linked not in seen or seen[linked].dataset_type != "conditioning":
                raise SystemExit(f"{source}, dataset {dataset.id!r}: conditioning_data {linked!r} is not the id of a "
                                 "dataset with \"dataset_type\": \"conditioning\"")
        for linked in as_list(dataset.conditioning_data):
            if folders_overlap(dataset.instance_data_dir, seen[linked].instance_data_dir):
                raise SystemExit(f"{source}, dataset {dataset.id!r}: its images and its masks ({linked!r}) share a "
                                 "folder (or one holds the other), so masks would be trained on as images: keep them "
                                 "in separate folders")
        if len(as_list(dataset.conditioning_data)) > 1:
            raise SystemExit(f"{source}, dataset {dataset.id!r}: link one mask dataset in conditioning_data, not "
                             f"{len(as_list(dataset.conditioning_data))}")

    cache_root = args.cache_dir or os.path.join(args.output_dir, "cache")
    for dataset in datasets:
        if dataset.resolution is None:
            dataset.resolution = args.resolution
        if dataset.resolution_type is None:
            dataset.resolution_type = args.resolution_type
        if dataset.cache_dir_vae is None:
            dataset.cache_dir_vae = os.path.join(cache_root, "vae", safe_folder_name(dataset.id))
    refuse_outputs_among_data(datasets, args, source)
    return datasets


def refuse_outputs_among_data(datasets, args, source):
    """Nothing this run writes (output, caches) may lie inside a data folder: it would sit among the person's
    pictures, and the validation images saved there would be trained on as the subject next time."""
    written = {"--output_dir": args.output_dir, "the text embedding cache": text_cache_dir(datasets, args)}
    written.update({f"dataset {d.id!r}'s cache_dir_vae": d.cache_dir_vae for d in datasets
                    if d.dataset_type in ("image", "eval")})
    for dataset in datasets:
        if dataset.dataset_type == "text_embeds":
            continue
        for what, folder in written.items():
            if folder and inside(folder, dataset.instance_data_dir):
                raise SystemExit(f"{source}: {what} ({folder}) lies inside the images of dataset {dataset.id!r} "
                                 f"({dataset.instance_data_dir}); outputs would be mixed with the pictures. Choose a "
                                 "folder outside it.")


def as_list(value):
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def text_cache_dir(datasets, args):
    """Where text embeddings go: the default text_embeds dataset's cache_dir, else OUTPUT_DIR/cache/text."""
    entries = [d for d in datasets if d.dataset_type == "text_embeds"]
    chosen = next((d for d in entries if d.default), entries[0] if entries else None)
    if chosen is not None and chosen.cache_dir:
        return chosen.cache_dir
    return os.path.join(args.cache_dir or os.path.join(args.output_dir, "cache"), "text")


def announce_pending_features(datasets, print_fn=print):
    """Keys whose feature a later version adds are accepted, never silently: each gets a one-line notice."""
    for dataset in datasets:
        if dataset.dataset_type == "eval":
            print_fn(f"notice: dataset {dataset.id!r} is an eval set: held out, never trained on, scored by the "
                     "eval loss (--eval_steps_interval, evaluate.py)")


# ---------------------------------------------------------------------------------------------------------------------
# 4. Images: discovery, decoding, captions


def inside(path, folder):
    """True when `path` is `folder` or lies under it, both resolved (symbolic links followed, `..` applied)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def folders_overlap(a, b):
    """True when two folders are the same or one lies inside the other."""
    return inside(a, b) or inside(b, a)


def confined(path, folder):
    """`path`, after checking that writing it stays inside `folder`: a name built from a data file's relative path
    must not lead elsewhere through a symbolic link planted in the output or cache tree."""
    if not inside(path, folder):
        raise SystemExit(f"{path} resolves to {os.path.realpath(path)}, outside {folder}, where it was meant to be "
                         "written (a symbolic link in that folder leads out of it); remove the link or choose "
                         "another folder")
    return path


def stem_clashes(paths, root):
    """Groups of images that share a relative path without extension (a.jpg and a.png): a mask pairs by that name,
    so such images cannot each have their own."""
    groups = {}
    for path in paths:
        groups.setdefault(os.path.splitext(os.path.relpath(path, root))[0], []).append(path)
    return [group for group in groups.values() if len(group) > 1]


def find_images(folder):
    """Image files under `folder`, recursively and sorted; hidden files skipped; symlink loops reported, not followed.

    Returns (paths, problems) where problems is a list of (path, reason)."""
    found, problems, visited = [], [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            problems.append((root, f"symlink loop: {real} was already searched; not followed again"))
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(root, name))
    return found, problems


def header_orientation(image):
    """The EXIF orientation without decoding pixels. (Pillow's getexif() decodes a whole PNG to find its eXIf
    chunk, so for PNG only a chunk before the pixel data is read; load_image checks the decoded size anyway.)"""
    if image.format == "PNG":
        raw = image.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(EXIF_ORIENTATION, 1)
    return image.getexif().get(EXIF_ORIENTATION, 1)


def image_size(path):
    """(width, height) as the image will be seen (EXIF rotation applied), read from the header only.

    Raises ValueError with the reason when the file is not a usable image."""
    try:
        if os.path.getsize(path) == 0:
            raise ValueError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"{width}x{height} is {width * height / 1e6:.0f} MP, over the "
                                     f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP limit (a decompression bomb or a huge scan); "
                                     "refused before decoding: downscale it")
                orientation = header_orientation(image)
    except Image.DecompressionBombError as err:
        raise ValueError(f"refused before decoding ({err}); a decompression bomb or a huge scan: downscale it") from None
    except UnidentifiedImageError:
        raise ValueError("not an image PIL can read (wrong extension, or not an image at all)") from None
    except FileNotFoundError:
        raise ValueError("cannot read: a broken symlink or a file that vanished") from None
    except OSError as err:
        raise ValueError(f"cannot read ({err}); re-export or remove it") from None
    if orientation in (5, 6, 7, 8):  # rotated 90 or 270 degrees
        width, height = height, width
    return width, height


def to_rgb(image):
    """Any PIL image as 8-bit RGB: 16-bit scaled (not clipped), transparency composited on white, CMYK converted."""
    if image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8))
    elif image.mode in ("I", "F"):  # 32-bit: 16-bit data if it goes above 255, else already 0..255
        array = np.asarray(image, dtype=np.float64)
        if array.max(initial=0) > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8))
    if "transparency" in image.info and image.mode in ("P", "L", "RGB"):  # palette or colour-key transparency
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_image(path):
    """Decode an image fully: upright (EXIF), RGB. Raises ValueError naming the problem (truncated, unreadable...)."""
    expected = image_size(path)  # the header checks first: empty files and bombs never reach the decoder
    try:
        with Image.open(path) as image:
            image.load()
            upright = to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot decode ({err}); the file is probably truncated or corrupt: re-export or remove it") from None
    if upright.size != expected:  # e.g. an EXIF rotation stored after a PNG's pixel data
        raise ValueError(f"decodes to {upright.size[0]}x{upright.size[1]} but its header says {expected[0]}x{expected[1]}; "
                         "re-export it without EXIF rotation")
    return upright


def caption_from_filename(path):
    """'ohwx_dog_03.jpg' -> 'ohwx dog'; 'a photo of ohwx (2).png' -> 'a photo of ohwx'."""
    stem = os.path.splitext(os.path.basename(path))[0].replace("_", " ")
    stem = re.sub(r"(\s*(\(\d+\)|\d+))+$", "", stem)
    return " ".join(stem.split())


def caption_file(path):
    return os.path.splitext(path)[0] + ".txt"


def captions_for(path, dataset):
    """The caption of an image as a list of choices (one element unless instance_prompt is a list)."""
    if dataset.caption_strategy == "instanceprompt":
        return as_list(dataset.instance_prompt)
    if dataset.caption_strategy == "textfile":
        with open(caption_file(path), encoding="utf-8") as handle:
            return [" ".join(handle.read().split())]
    return [caption_from_filename(path)]


# ---------------------------------------------------------------------------------------------------------------------
# 5. Aspect buckets and crops


def round64(x):
    return max(64, int(math.floor(x / 64.0 + 0.5)) * 64)  # halves round up (Python's round() goes to even)


def size_measure(width, height, resolution_type):
    """An image's size in the unit of its dataset's resolution_type (used for min/max/target sizes too)."""
    if resolution_type == "pixel":
        return min(width, height)  # shorter edge, px
    if resolution_type == "area":
        return width * height / 1e6  # megapixels
    return math.sqrt(width * height)  # pixel_area: the edge of a square of the same area, px


def scale_to(width, height, value, resolution_type):
    """The factor that makes (width, height) measure `value` in the given resolution_type."""
    if resolution_type == "pixel":
        return value / min(width, height)
    target_area = value * 1e6 if resolution_type == "area" else value * value
    return math.sqrt(target_area / (width * height))


def bucket_for(width, height, dataset):
    """The training size of an image: about the requested edge/area, its aspect (or square), sides multiples of 64.

    pixel: shorter edge = resolution. area: resolution megapixels. pixel_area: resolution px edge, as an area
    (1024 -> 1.048576 MP). With crop + crop_aspect square the bucket is square."""
    res, kind = dataset.resolution, dataset.resolution_type
    if dataset.crop and dataset.crop_aspect == "square":
        side = res if kind == "pixel" else math.sqrt(res * 1e6 if kind == "area" else res * res)
        return round64(side), round64(side)
    # The shorter side is a multiple of 64 near its ideal length; the longer one is the aspect-kept length rounded
    # *down*, so the bucket is never wider than the image and the cover-resize trims < 64 px, from the long side.
    short, long = min(width, height), max(width, height)
    ideal = short * scale_to(width, height, res, kind)

    def with_long_side(short_side):
        return short_side, max(short_side, int(long * short_side / short) // 64 * 64)

    if kind == "pixel":  # the shorter edge is the resolution
        short_side, long_side = with_long_side(round64(ideal))
    else:  # of the two nearest shorter sides, the one giving the area closest to the requested one
        target_area = (ideal / short) ** 2 * width * height
        candidates = [with_long_side(max(64, math.floor(ideal / 64) * 64)), with_long_side(math.ceil(ideal / 64) * 64)]
        short_side, long_side = min(candidates, key=lambda c: abs(c[0] * c[1] - target_area))
    return (long_side, short_side) if width >= height else (short_side, long_side)


def plan_transform(width, height, dataset, seed, key):
    """Every geometric step from the original image to the training tensor, decided from the size alone.

    Returns a dict (all sizes are width, height): original_size, downsampled_size (an oversized image is first
    brought to about target_downsample_size), resized_size (covers the bucket, aspect kept), crop_box
    (left, top, right, bottom in the resized image) and target_size (the bucket). A random crop is drawn from
    `seed` and `key`, so re-caching an image gives the same crop."""
    down_w, down_h = width, height
    if dataset.maximum_image_size and size_measure(width, height, dataset.resolution_type) > dataset.maximum_image_size:
        target = dataset.target_downsample_size or dataset.maximum_image_size
        scale = scale_to(width, height, target, dataset.resolution_type)
        if scale < 1:
            down_w, down_h = max(1, round(width * scale)), max(1, round(height * scale))
    bucket_w, bucket_h = bucket_for(down_w, down_h, dataset)
    scale = max(bucket_w / down_w, bucket_h / down_h)
    resized_w, resized_h = max(bucket_w, round(down_w * scale)), max(bucket_h, round(down_h * scale))
    spare_w, spare_h = resized_w - bucket_w, resized_h - bucket_h
    style = dataset.crop_style if dataset.crop else "center"  # without crop only the <64 px rounding is trimmed
    if style == "random":
        rng = random.Random(f"{seed}/{key}")
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    elif style == "corner":
        left, top = 0, 0
    else:
        left, top = spare_w // 2, spare_h // 2
    return {
        "original_size": [width, height],
        "downsampled_size": [down_w, down_h],
        "resized_size": [resized_w, resized_h],
        "crop_box": [left, top, left + bucket_w, top + bucket_h],
        "target_size": [bucket_w, bucket_h],
    }


def apply_transform(image, transform, resample=Image.LANCZOS):
    """Resize and crop a decoded image (or its mask) exactly as plan_transform decided."""
    if tuple(transform["downsampled_size"]) != image.size:
        image = image.resize(tuple(transform["downsampled_size"]), resample)
    if tuple(transform["resized_size"]) != image.size:
        image = image.resize(tuple(transform["resized_size"]), resample)
    return image.crop(tuple(transform["crop_box"]))


def load_mask(path):
    """A mask as 8-bit grey, upright: white = trained on, black = ignored, grey = partial weight."""
    return load_image(path).convert("L")


def mask_to_latent_grid(mask, transform, factor):
    """The mask through its image's very own resize and crop (bilinear: no ringing at the edges), then averaged
    over each latent cell's factor x factor pixels. Returns (1, h, w) in [0, 1]."""
    pixels = apply_transform(mask, transform, Image.BILINEAR)
    grid = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0)[None, None]
    return torch.nn.functional.avg_pool2d(grid, factor)[0]


def image_to_tensor(image):
    """PIL RGB -> float tensor (3, H, W) in [-1, 1], what the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class ImageEntry:
    """One training image of one dataset at its bucket: where it comes from and where its latent is cached."""

    dataset_id: str
    path: str
    relpath: str
    captions: list
    transform: dict
    cache_path: str
    is_regularisation: bool = False
    mask_path: str = None  # the paired mask (masked loss), if the dataset links a mask dataset
    fingerprint: dict = field(default=None, repr=False)
    mask_fingerprint: dict = field(default=None, repr=False)

    @property
    def bucket(self):
        return tuple(self.transform["target_size"])


def vae_cache_path(dataset, relpath, transform):
    width, height = transform["target_size"]
    return confined(os.path.join(dataset.cache_dir_vae, f"{relpath}-{width}x{height}.safetensors"),
                    dataset.cache_dir_vae)


def pair_masks(paths, dataset, mask_dataset):
    """{image path: mask path}: the mask at the same relative path in the mask dataset's folder, with any image
    extension (a.jpg <-> a.png; a PNG wins if there are several). A missing mask is an error listing them all."""
    clashes = stem_clashes(paths, dataset.instance_data_dir)
    if clashes:
        listing = "\n  ".join(", ".join(group) for group in clashes)
        raise SystemExit(f"dataset {dataset.id!r}: images that differ only in their extension would share one mask; "
                         f"rename one of each:\n  {listing}")
    masks = {}
    for mask in find_images(mask_dataset.instance_data_dir)[0]:
        stem = os.path.splitext(os.path.relpath(mask, mask_dataset.instance_data_dir))[0]
        if stem not in masks or mask.lower().endswith(".png"):
            masks[stem] = mask
    pairs, missing = {}, []
    for path in paths:
        stem = os.path.splitext(os.path.relpath(path, dataset.instance_data_dir))[0]
        if stem in masks:
            pairs[path] = masks[stem]
        else:
            missing.append(os.path.join(mask_dataset.instance_data_dir, stem + ".png"))
    if missing:
        listing = "\n  ".join(missing)
        raise SystemExit(f"dataset {dataset.id!r} uses the masks of {mask_dataset.id!r}, but {len(missing)} image(s) "
                         f"have no mask; every image needs one (a white mask trains on the whole image; "
                         f"make_masks.py makes them). Missing (any image extension will do):\n  {listing}")
    return pairs


def plan_dataset(dataset, seed, mask_dataset=None):
    """Discover a dataset's images and decide each one's caption, bucket, crop and mask, reading headers only.

    Returns (entries, skipped): skipped is a list of (path, reason). Missing caption files or masks are an error
    that lists every missing file."""
    paths, skipped = find_images(dataset.instance_data_dir)
    if dataset.caption_strategy == "textfile":
        missing = [p for p in paths if not os.path.isfile(caption_file(p))]
        if missing:
            listing = "\n  ".join(caption_file(p) for p in missing)
            raise SystemExit(f"dataset {dataset.id!r} uses caption_strategy 'textfile' but {len(missing)} caption "
                             f"file(s) are missing; write them or change the strategy:\n  {listing}")
    masks = pair_masks(paths, dataset, mask_dataset) if mask_dataset else {}
    entries = []
    for path in paths:
        try:
            width, height = image_size(path)
        except ValueError as err:
            skipped.append((path, str(err)))
            continue
        if min(width, height) < MIN_IMAGE_EDGE:
            skipped.append((path, f"{width}x{height} is too small to train on (under {MIN_IMAGE_EDGE} px)"))
            continue
        measure = size_measure(width, height, dataset.resolution_type)
        if dataset.minimum_image_size and measure < dataset.minimum_image_size:
            skipped.append((path, f"{width}x{height} is below minimum_image_size {dataset.minimum_image_size:g} "
                                  f"({dataset.resolution_type}: {measure:.4g})"))
            continue
        mask = masks.get(path)
        if mask:
            try:
                mask_size = image_size(mask)
            except ValueError as err:
                skipped.append((path, f"its mask {mask}: {err}"))
                continue
            if mask_size != (width, height):
                skipped.append((path, f"its mask {mask} is {mask_size[0]}x{mask_size[1]}, the image {width}x{height}; "
                                      "a mask must have its image's size (remake it)"))
                continue
        relpath = os.path.relpath(path, dataset.instance_data_dir)
        transform = plan_transform(width, height, dataset, seed, f"{dataset.id}/{relpath}")
        entries.append(ImageEntry(
            dataset_id=dataset.id, path=path, relpath=relpath, captions=captions_for(path, dataset),
            transform=transform, cache_path=vae_cache_path(dataset, relpath, transform),
            is_regularisation=dataset.is_regularisation_data, mask_path=mask,
        ))
    return entries, skipped


def mask_dataset_of(dataset, datasets):
    """The mask dataset an image dataset links with conditioning_data, or None."""
    linked = [d for d in datasets if d.id in as_list(dataset.conditioning_data) and d.conditioning_type == "mask"]
    return linked[0] if linked else None


def crop_seed(args):
    """Random crops are part of the cache, so they follow --seed when given and 0 otherwise (never a random draw):
    cache_latents.py and an unseeded training run then agree on them."""
    return args.seed if args.seed is not None else 0


def plan_datasets(datasets, seed, print_fn=print):
    """plan_dataset for every image dataset, printing each skipped file with its reason."""
    plans = {}
    for dataset in datasets:
        if dataset.dataset_type not in ("image", "eval"):
            continue
        entries, skipped = plan_dataset(dataset, seed, mask_dataset_of(dataset, datasets))
        for path, reason in skipped:
            print_fn(f"skipped {path}: {reason}")
        if not entries:
            raise SystemExit(f"dataset {dataset.id!r} ({dataset.instance_data_dir}) has no usable images"
                             + (f": all {len(skipped)} were skipped (reasons above)" if skipped else ": the folder holds no "
                                f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files"))
        plans[dataset.id] = entries
    return plans


# ---------------------------------------------------------------------------------------------------------------------
# 6. Models: loading and family detection


@dataclass
class ModelInfo:
    """What the scripts need to know about a base model, read from its configs (never guessed from its name)."""

    ref: str  # what the user gave: folder, hub id or file
    folder: str  # a local diffusers folder holding it
    family: str  # sd1 | sd2 | sdxl | sdxl-refiner
    prediction_type: str  # epsilon | v_prediction
    variant: str = None
    model_index: dict = None
    unet_config: dict = None
    vae_config: dict = None
    text_encoder_precisions: dict = field(default_factory=dict)  # {"text_encoder_2": "int8-quanto", ...}
    num_train_timesteps: int = 1000
    allow_pickle: bool = False  # --allow_pickle: load .bin/.pt weights (a pickle can run code) where no safetensors

    @property
    def vae_scale_factor(self):
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def native_resolution(self):
        return self.unet_config["sample_size"] * self.vae_scale_factor

    @property
    def text_parts(self):
        """(tokenizer, text encoder) subfolders this family encodes prompts with, in pipeline order."""
        if self.family == "sdxl":
            return [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
        if self.family == "sdxl-refiner":
            return [("tokenizer_2", "text_encoder_2")]
        return [("tokenizer", "text_encoder")]


def detect_family(model_index, unet_config, where):
    """The model family from its own configs, so tiny test models are detected like real ones.

    SDXL: the UNet takes 'text_time' added conditioning; the refiner has no first text encoder and scores
    aesthetics. SD 2.x: 1024-wide cross-attention (OpenCLIP-H) or, for small models, linear attention
    projections (an SD 2 trait SD 1 UNets lack). Everything else with a CLIP text encoder is SD 1.x."""
    if unet_config.get("addition_embed_type") == "text_time":
        has_te1 = (model_index.get("text_encoder") or [None])[0] is not None
        if model_index.get("requires_aesthetics_score") or not has_te1:
            return "sdxl-refiner"
        return "sdxl"
    if unet_config.get("addition_embed_type") is not None or unet_config.get("in_channels", 4) != 4:
        raise SystemExit(f"{where}: this UNet (addition_embed_type={unet_config.get('addition_embed_type')}, "
                         f"in_channels={unet_config.get('in_channels')}) is not an SD 1.x/2.x/SDXL text-to-image model; "
                         "inpainting and other variants are not supported")
    if unet_config.get("cross_attention_dim") == 1024 or unet_config.get("use_linear_projection"):
        return "sd2"
    return "sd1"


def single_file_family(path):
    """The family of an original-format (LDM / A1111) checkpoint, from its tensor names."""
    with safe_open(path, framework="pt") as handle:
        keys = set(handle.keys())
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "sdxl-refiner"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise SystemExit(f"{path}: not a Stable Diffusion checkpoint this tool recognises (no text-encoder tensors found)")


def convert_single_file(path, args, cache_root):
    """Load a single-file checkpoint with diffusers' from_single_file once and keep it as a diffusers folder.

    Later runs (and caching) then load the folder directly; the folder name carries the file's fingerprint, so an
    edited checkpoint is converted again."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    if not path.endswith(".safetensors"):
        raise SystemExit(f"{path}: only .safetensors single-file checkpoints are loaded (a .ckpt file is a pickle "
                         "that can run code); convert it to safetensors first")
    family = single_file_family(path)
    folder = os.path.join(cache_root, "converted", f"{safe_folder_name(os.path.basename(path))}-{sampled_digest(path)[:12]}")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    cls = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline,
           "sdxl-refiner": StableDiffusionXLImg2ImgPipeline}[family]
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
    print(f"converting single-file checkpoint {path} ({family}) to a diffusers folder in {folder}")
    try:
        pipe = cls.from_single_file(path, config=args.single_file_config, local_files_only=args.local_files_only, **extra)
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


def download_model(ref, args):
    """A hub id -> the local snapshot folder diffusers would load from (only the parts training needs)."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.download(
            ref, revision=args.revision, variant=args.variant, local_files_only=args.local_files_only,
            use_safetensors=None if getattr(args, "allow_pickle", False) else True, safety_checker=None,
            feature_extractor=None, image_encoder=None,
        )
    except Exception as err:
        offline = " (offline: HF_HUB_OFFLINE or --local_files_only is set)" if args.local_files_only or \
            os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise SystemExit(f"could not get model {ref!r} from the hub{offline}: {err}. Check the id, or give a local "
                         "diffusers folder.") from None


def resolve_model(args):
    """Find the model (folder, hub id or single file), read its configs and detect its family. Loads no weights."""
    ref = args.pretrained_model_name_or_path
    if not ref:
        raise SystemExit("--pretrained_model_name_or_path is required: a diffusers folder, a hub id or a .safetensors file")
    if os.path.isfile(ref):
        folder = convert_single_file(ref, args, args.cache_dir or os.path.join(args.output_dir, "cache"))
    elif os.path.isdir(ref):
        folder = ref
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not ref.startswith("."):  # owner/name: a hub id
        folder = download_model(ref, args)
    else:
        raise SystemExit(f"--pretrained_model_name_or_path {ref}: no such folder or file (nor a hub id owner/name)")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise SystemExit(f"{ref}: not a diffusers model folder (no model_index.json). Point at the folder that holds "
                         "model_index.json, or at a single .safetensors checkpoint.")
    model_index = read_json(os.path.join(folder, "model_index.json"))
    for part in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        if not os.path.isfile(os.path.join(folder, part)):
            raise SystemExit(f"{ref}: the model folder has no {part}; it is incomplete or not a text-to-image model")
    allow_pickle = bool(getattr(args, "allow_pickle", False))
    if not allow_pickle:
        refuse_pickle_only_weights(ref, folder, model_index)
    unet_config = read_json(os.path.join(folder, "unet", "config.json"))
    family = detect_family(model_index, unet_config, ref)
    scheduler_config = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    return ModelInfo(
        ref=ref, folder=folder, family=family, variant=args.variant, model_index=model_index, unet_config=unet_config,
        prediction_type=scheduler_config.get("prediction_type", "epsilon"),
        num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
        vae_config=read_json(os.path.join(folder, "vae", "config.json")),
        text_encoder_precisions={name: getattr(args, f"text_encoder_{i}_precision", "no_change") or "no_change"
                                 for i, name in enumerate(("text_encoder", "text_encoder_2", "text_encoder_3"), 1)},
        allow_pickle=allow_pickle,
    )


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle_only_weights(ref, folder, model_index):
    """Exit if a weighted component of the model folder has pickle weights and no safetensors: unpickling a file
    someone else made can run any code. (The loaders are also told to take safetensors only.)"""
    for name, spec in model_index.items():
        part = os.path.join(folder, name)
        if not name.startswith("_") and isinstance(spec, list) and os.path.isdir(part):
            safe_weights(part, where=f"{ref}: {name}/")


def safe_weights(ref, allow_pickle=False, where=None):
    """The from_pretrained options that keep pickles out of a model given by local folder or hub id:
        Model.from_pretrained(ref, **safe_weights(ref, args.allow_pickle))
    A local folder with pickle weights and no safetensors exits here, naming the folder (or `where`); any other
    is loaded with use_safetensors=True, so a hub download cannot fall back to a pickle either. With
    allow_pickle (--allow_pickle) nothing is checked and from_pretrained takes whatever the model has."""
    if allow_pickle:
        return {}
    if os.path.isdir(ref):
        files = os.listdir(ref)
        pickles = sorted(f for f in files if f.endswith(PICKLE_WEIGHTS))
        if pickles and not any(f.endswith(".safetensors") for f in files):
            raise SystemExit(f"{where or os.path.join(ref, '')} has only pickle weights ({', '.join(pickles)}); "
                             "loading a pickle can run code. Convert it to safetensors (load it once where you "
                             "trust it and save_pretrained with safe_serialization=True), or pass --allow_pickle if "
                             "you trust its source.")
    return {"use_safetensors": True}


def component_identity(info, subfolder):
    """A fingerprint of one model component (configs hashed whole, weight files sampled), for cache validity."""
    digest = hashlib.sha256(f"{subfolder}|{info.variant}".encode())
    root = os.path.join(info.folder, subfolder)
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith((".json", ".txt")):
            with open(path, "rb") as handle:
                digest.update(name.encode() + handle.read())
        elif name.endswith(".safetensors"):
            digest.update(name.encode() + sampled_digest(path).encode())
    return digest.hexdigest()[:24]


def load_component(info, subfolder, dtype=torch.float32):
    """Load one pipeline component by the class its model_index.json names (UNet, VAE, text encoder, tokenizer)."""
    import diffusers
    import transformers

    library, class_name = info.model_index[subfolder]
    module = diffusers if library == "diffusers" else transformers
    kwargs = {}
    if not subfolder.startswith(("tokenizer", "scheduler")):  # weights: dtype and variant apply; no pickles
        kwargs = {"torch_dtype" if library == "diffusers" else "dtype": dtype, "variant": info.variant,
                  "use_safetensors": None if info.allow_pickle else True}
    try:
        return getattr(module, class_name).from_pretrained(info.folder, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        raise SystemExit(f"{info.ref}: cannot load {subfolder} ({err})") from None


def load_text_encoders(info, device="cpu", dtype=torch.float32):
    """The family's tokenizers and frozen text encoders: loaded in `dtype`, then quantised as
    --text_encoder_N_precision asks (a quantised weight's dtype cannot change afterwards)."""
    tokenizers, encoders = [], []
    for tokenizer_name, encoder_name in info.text_parts:
        tokenizers.append(load_component(info, tokenizer_name))
        encoder = quantize_model(load_component(info, encoder_name, dtype), info.text_encoder_precisions.get(encoder_name),
                                 dtype)
        encoder.to(device).requires_grad_(False).eval()
        encoders.append(encoder)
    return tokenizers, encoders


def load_pipeline(info, device="cpu", dtype=torch.float32):
    """The model's own inference pipeline (its scheduler included), every component loaded from the folder."""
    tokenizers, text_encoders = load_text_encoders(info, device, dtype)
    unet = load_component(info, "unet", dtype).to(device)
    vae = load_component(info, "vae", dtype).to(device)  # SDXL's pipeline upcasts its VAE itself (force_upcast)
    return build_pipeline(info, unet, vae, tokenizers, text_encoders)


def build_pipeline(info, unet, vae, tokenizers, text_encoders, scheduler=None):
    """A diffusers inference pipeline from components already in memory (for validation images)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = scheduler or load_component(info, "scheduler")
    if info.family == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                         scheduler=scheduler)
    if info.family == "sdxl-refiner":  # text encoder 2 only; it refines images (img2img)
        from diffusers import StableDiffusionXLImg2ImgPipeline

        return StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text_encoders[0],
                                                tokenizer=None, tokenizer_2=tokenizers[0], unet=unet,
                                                scheduler=scheduler, requires_aesthetics_score=True)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def check_precision(precision, flag):
    """Refuse, before any model work, a precision this machine or install cannot run."""
    if precision == "fp8-torchao":
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
            raise SystemExit(f"{flag} fp8-torchao needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); "
                             "this machine has none. Use fp8-quanto or int8-quanto.")
        try:
            from torchao.quantization import Float8WeightOnlyConfig, quantize_  # noqa: F401
        except ImportError:
            raise SystemExit(f"{flag} fp8-torchao needs a torchao with Float8WeightOnlyConfig: pip install -U torchao") \
                from None
    if precision.endswith("-quanto"):
        try:
            import optimum.quanto  # noqa: F401
        except ImportError:
            raise SystemExit(f"{flag} {precision} needs optimum-quanto: pip install optimum-quanto") from None
    if precision == "nf4-bnb":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SystemExit(f"{flag} nf4-bnb needs bitsandbytes: pip install bitsandbytes") from None


def to_nf4(module, compute_dtype):
    """Swap every nn.Linear for a bitsandbytes 4-bit NF4 layer, in place. (diffusers' own bitsandbytes loader
    refuses the CPU; done by hand the same layers work on CPU and GPU alike.) Attribute names stay, so an adapter
    trained on top is saved against the ordinary layer names."""
    import bitsandbytes as bnb

    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear) and not isinstance(child, bnb.nn.Linear4bit):
            # LinearNF4 (not a generic Linear4bit): LyCORIS recognises it and adapts it in bypass mode.
            quantized = bnb.nn.LinearNF4(child.in_features, child.out_features, bias=child.bias is not None,
                                         compute_dtype=compute_dtype)
            quantized.weight = bnb.nn.Params4bit(child.weight.data.to(compute_dtype), requires_grad=False,
                                                 quant_type="nf4")
            if child.bias is not None:
                quantized.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(module, name, quantized.to(child.weight.device))
        else:
            to_nf4(child, compute_dtype)


def quantize_model(model, precision, compute_dtype=torch.float32):
    """Quantise a model's weights in place and freeze it (load -> quantise -> freeze; adapters come after)."""
    if precision in (None, "no_change"):
        return model
    if precision.endswith("-quanto"):
        from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantize

        quantize(model, weights={"int8": qint8, "int4": qint4, "int2": qint2, "fp8": qfloat8}[precision.split("-")[0]])
        freeze(model)
    elif precision == "nf4-bnb":
        to_nf4(model, compute_dtype)
    elif precision == "fp8-torchao":
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

        quantize_(model, Float8WeightOnlyConfig())
    else:
        raise ValueError(f"unknown precision {precision!r}")
    release_freed_memory()
    return model.requires_grad_(False)  # quantised layers come with fresh parameters: freeze after, not before


def release_freed_memory():
    """Hand memory freed by quantisation back to the system. glibc keeps freed heap for reuse, so without this a
    quantised model's process holds as much host RAM as the full-precision one did (measured: 2.9 GB of heap
    before, 0.75 GB after, for a 2 GB UNet quantised to int8)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        pass


def load_adapter(pipe, path):
    """Apply a trained adapter to a pipeline's UNet: a LyCORIS file with LyCORIS's own loader, anything else with
    diffusers' load_lora_weights. `path` is a .safetensors file or an output folder."""
    file = path if os.path.isfile(path) else os.path.join(path, "pytorch_lora_weights.safetensors")
    with safe_open(file, framework="pt") as handle:
        is_lycoris = any(key.startswith("lycoris_") for key in handle.keys())
        config = json.loads((handle.metadata() or {}).get("lycoris_config", "{}"))
    if is_lycoris:
        from lycoris import create_lycoris_from_weights

        network, _ = create_lycoris_from_weights(config.get("multiplier", 1.0), file, pipe.unet)  # as trained
        network.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
        network.apply_to()
        pipe.unet.add_module("lycoris", network)  # keeps it alive and findable, as in training
    else:
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # else: a warning that the (untrained) text encoder has no LoRA keys
        try:
            pipe.load_lora_weights(os.path.dirname(file) or ".", weight_name=os.path.basename(file))
        finally:
            diffusers_logging.set_verbosity(verbosity)
    return pipe


# ---------------------------------------------------------------------------------------------------------------------
# 7. Text encoding and SDXL time ids


@torch.no_grad()
def encode_prompt(info, tokenizers, text_encoders, prompts):
    """Prompt embeddings exactly as the family's diffusers pipeline computes them in encode_prompt.

    SD 1.x / 2.x: the text encoder's last hidden state (SD 2's shipped encoder is already cut to the penultimate
    layer). SDXL: penultimate hidden states of both encoders concatenated, pooled output of the second.
    Returns {"prompt_embeds": (B, 77, D)} plus "pooled_prompt_embeds": (B, D') for SDXL."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        ids = tokens.input_ids.to(encoder.device)
        if info.family in ("sd1", "sd2"):
            mask = tokens.attention_mask.to(encoder.device) if getattr(encoder.config, "use_attention_mask", False) else None
            hidden.append(encoder(ids, attention_mask=mask)[0])
        else:
            output = encoder(ids, output_hidden_states=True)
            if output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds, the pooled vector SDXL uses
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
    result = {"prompt_embeds": torch.cat(hidden, dim=-1).float()}
    if pooled is not None:
        result["pooled_prompt_embeds"] = pooled.float()
    return result


def sdxl_time_ids(transform, aesthetic_score=None):
    """SDXL's micro-conditioning: original size, crop top-left, target size, each as (height, width). The refiner
    (give `aesthetic_score`) takes original size, crop top-left and the aesthetic score instead: 5 values."""
    width, height = transform["original_size"]
    left, top = transform["crop_box"][:2]
    if aesthetic_score is not None:
        return torch.tensor([height, width, top, left, aesthetic_score], dtype=torch.float32)
    target_w, target_h = transform["target_size"]
    return torch.tensor([height, width, top, left, target_h, target_w], dtype=torch.float32)


def refine_sources(entries, count, seed):
    """What a refiner's validation and evaluation refine: `count` subject images chosen by `seed`, resized and
    cropped to their buckets as training saw them, each with its caption as the prompt."""
    chosen = random.Random(seed).sample(entries, min(count, len(entries)))
    return [(entry.captions[0], apply_transform(load_image(entry.path), entry.transform)) for entry in chosen]


def pipeline_call(args, prompt, seed, steps, guidance_scale, negative_prompt, resolution, source=None):
    """Keyword arguments for one generated image: text-to-image at `resolution`, or for a refiner, img2img of
    `source` at --refiner_training_strength with --data_aesthetic_score. The seed fixes the image."""
    call = dict(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed))
    if source is not None:
        call.update(image=source, strength=args.refiner_training_strength, aesthetic_score=args.data_aesthetic_score)
    else:
        call.update(height=resolution, width=resolution)
    return call


def add_refiner_args(parser):
    group = parser.add_argument_group("SDXL refiner")
    group.add_argument("--data_aesthetic_score", type=float, default=7.0,
                       help="the refiner's aesthetic-score conditioning for the training images")
    group.add_argument("--refiner_training_strength", type=float, default=0.2,
                       help="the refiner trains (and is validated) on the lowest-noise share of the timesteps")


def timestep_range(info, args):
    """Training timesteps are drawn from [0, this): the whole schedule, or for the refiner the low-noise end it
    serves (its img2img strength)."""
    if info.family != "sdxl-refiner":
        return info.num_train_timesteps
    return max(2, round(info.num_train_timesteps * args.refiner_training_strength))


def refiner_conditioning(info, args):
    """The aesthetic score sdxl_time_ids needs for a refiner, None for every other family."""
    return args.data_aesthetic_score if info.family == "sdxl-refiner" else None


# ---------------------------------------------------------------------------------------------------------------------
# 8. Caches


def cache_metadata(path):
    """The provenance record of a cache file, or None if the file is missing, truncated or not one of ours.

    The record is one canonical JSON string under a single key: safetensors writes metadata keys in a random
    order, and a single key keeps two identical cache files byte-identical."""
    try:
        with safe_open(path, framework="pt") as handle:
            return json.loads((handle.metadata() or {})["cache"])
    except Exception:  # missing, truncated, foreign: never trusted
        return None


def cache_metadata_matches(path, expected):
    metadata = cache_metadata(path)
    return metadata is not None and all(metadata.get(key) == value for key, value in expected.items())


def save_cache_file(tensors, path, metadata):
    save_safetensors_atomic(tensors, path, {"cache": canonical_json(metadata)})


def vae_cache_metadata(entry, vae_identity):
    return {"format_version": CACHE_FORMAT_VERSION, "source": entry.fingerprint, "transform": entry.transform,
            "vae": vae_identity, "mask": entry.mask_fingerprint}


def fixed_batches(entries, batch_size):
    """Encoding batches that depend only on the entry list: each bucket's entries in path order, in chunks.

    A latent depends (in its last bits) on which images share its batch, so a re-run that encodes only what a
    killed run left over must encode it beside the same companions to write byte-identical files."""
    by_bucket = {}
    for entry in sorted(entries, key=lambda e: e.path):
        by_bucket.setdefault(entry.bucket, []).append(entry)
    return [members[i:i + batch_size] for _, members in sorted(by_bucket.items())
            for i in range(0, len(members), batch_size)]


def decode_batch(batch, latent_factor):
    """Load and transform a batch of images and their masks.

    Returns (entries that decoded, their pixel tensors, their latent-grid masks or None, [(entry, error)])."""
    decoded, pixels, masks, errors = [], [], [], []
    for entry in batch:
        try:
            image = image_to_tensor(apply_transform(load_image(entry.path), entry.transform))
        except ValueError as err:
            errors.append((entry, err))
            continue
        try:
            mask = mask_to_latent_grid(load_mask(entry.mask_path), entry.transform, latent_factor) \
                if entry.mask_path else None
        except ValueError as err:
            errors.append((entry, f"its mask {entry.mask_path}: {err}"))
            continue
        decoded.append(entry)
        pixels.append(image)
        masks.append(mask)
    return decoded, pixels, masks, errors


def prefetched(function, items):
    """function(item) for each item, computing the next one in a worker thread while the caller uses this one
    (image decoding then overlaps the VAE; at most one result waits, so memory stays bounded)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(function, items[0]) if items else None
        for i in range(len(items)):
            result = pending.result()
            pending = pool.submit(function, items[i + 1]) if i + 1 < len(items) else None
            yield result


def build_vae_cache(entries, info, device="cpu", batch_size=4, print_fn=print):
    """Make sure every entry has an up-to-date latent cache file; encode only where one is missing or stale.

    A cache file holds the VAE latent distribution (mean and std, so training can sample) and metadata: the
    source image's fingerprint, the transform, the VAE's identity and the format version. Images that fail to
    decode are reported and dropped; the VAE is loaded only if something needs encoding.
    Returns (usable entries, number of latents written)."""
    vae_identity = component_identity(info, "vae")
    for folder in {os.path.dirname(e.cache_path) for e in entries}:
        remove_stale_temporaries(folder)
    stale = set()
    for entry in entries:
        entry.fingerprint = file_fingerprint(entry.path)
        entry.mask_fingerprint = file_fingerprint(entry.mask_path) if entry.mask_path else None
        if not cache_metadata_matches(entry.cache_path, vae_cache_metadata(entry, vae_identity)):
            stale.add(entry.path)
    if not stale:
        print_fn(f"VAE cache: all {len(entries)} latents are up to date; nothing to encode")
        return entries, 0

    print_fn(f"VAE cache: encoding {len(stale)} of {len(entries)} images")
    vae, failed, written = None, set(), 0
    batches = [batch for batch in fixed_batches(entries, batch_size) if any(e.path in stale for e in batch)]
    with tqdm(total=len(stale), desc="caching latents", unit="img") as bar:
        decode = functools.partial(decode_batch, latent_factor=info.vae_scale_factor)
        for batch, (decoded, pixels, masks, errors) in zip(batches, prefetched(decode, batches)):
            for entry, err in errors:
                print_fn(f"skipped {entry.path}: {err}")
                failed.add(entry.path)
                if os.path.exists(entry.cache_path):  # a stale latent of an image that no longer decodes
                    os.remove(entry.cache_path)
            if any(e.path in stale for e in decoded):
                if vae is None:
                    vae = load_component(info, "vae").to(device).eval()
                with torch.no_grad():
                    dist = vae.encode(torch.stack(pixels).to(device, vae.dtype)).latent_dist
                for i, entry in enumerate(decoded):
                    if entry.path not in stale:  # up-to-date companions were encoded for their company only
                        continue
                    tensors = {"mean": dist.mean[i].float(), "std": dist.std[i].float()}
                    if masks[i] is not None:  # the mask travels with its latent: one file, one fingerprint
                        tensors["mask"] = masks[i]
                        if masks[i].max() == 0:
                            print_fn(f"warning: the mask {entry.mask_path} of {entry.path} is all black: this image "
                                     "adds nothing to the loss")
                    save_cache_file(tensors, entry.cache_path, vae_cache_metadata(entry, vae_identity))
                    written += 1
            bar.update(sum(e.path in stale for e in batch))
    return [e for e in entries if e.path not in failed], written


def text_encoder_identity(info):
    parts = [f"{info.family}|{TEXT_ENCODING_VERSION}"]
    for tokenizer_name, encoder_name in info.text_parts:
        parts += [component_identity(info, tokenizer_name), component_identity(info, encoder_name),
                  info.text_encoder_precisions.get(encoder_name) or "no_change"]  # a quantised encoder embeds otherwise
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def text_cache_path(cache_dir, caption, identity):
    # One file per (caption, text-encoder identity): the same folder can serve several models without confusion.
    return os.path.join(cache_dir, hashlib.sha256(f"{identity}\n{caption}".encode()).hexdigest()[:32] + ".safetensors")


def refuse_mixed_sdxl_text_cache(cache_dir, info):
    """The SDXL base embeds prompts with both text encoders, the refiner with the second alone: one text cache
    folder for both invites mixing them up, so a folder holding the other one's embeddings is refused."""
    other = {"sdxl": "sdxl-refiner", "sdxl-refiner": "sdxl"}.get(info.family)
    if other is None or not os.path.isdir(cache_dir):
        return
    for name in sorted(os.listdir(cache_dir)):
        if name.endswith(".safetensors") and (cache_metadata(os.path.join(cache_dir, name)) or {}).get("family") == other:
            kind = "refiner" if other == "sdxl-refiner" else "base-model"
            raise SystemExit(f"{cache_dir} holds SDXL {kind} text embeddings ({name}); the SDXL base and refiner encode "
                             "prompts differently, so each needs its own text cache: give this run another "
                             "text_embeds cache_dir (or --cache_dir). VAE caches can be shared.")


def build_text_cache(captions, info, cache_dir, device="cpu", batch_size=16, print_fn=print):
    """Encode every caption that has no up-to-date file in cache_dir. Returns {caption: cache path}."""
    identity = text_encoder_identity(info)
    remove_stale_temporaries(cache_dir)
    refuse_mixed_sdxl_text_cache(cache_dir, info)
    paths = {caption: text_cache_path(cache_dir, caption, identity) for caption in sorted(set(captions))}
    expected = {"format_version": CACHE_FORMAT_VERSION, "text_encoder": identity, "family": info.family}
    todo = [c for c, p in paths.items() if not cache_metadata_matches(p, {**expected, "caption": c})]
    if not todo:
        print_fn(f"text cache: all {len(paths)} caption embeddings are up to date; nothing to encode")
        return paths
    print_fn(f"text cache: encoding {len(todo)} of {len(paths)} captions")
    tokenizers, encoders = load_text_encoders(info, device)
    for start in tqdm(range(0, len(todo), batch_size), desc="caching text embeddings", unit="batch"):
        chunk = todo[start:start + batch_size]
        embeds = encode_prompt(info, tokenizers, encoders, chunk)
        for i, caption in enumerate(chunk):
            save_cache_file({name: value[i] for name, value in embeds.items()}, paths[caption],
                            {**expected, "caption": caption})
    return paths


def load_tensors(path):
    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def latent_scaling(info):
    """(shift, scale): the UNet sees (vae latent - shift) * scale."""
    return info.vae_config.get("shift_factor") or 0.0, info.vae_config.get("scaling_factor", 0.18215)


# ---------------------------------------------------------------------------------------------------------------------
# 9. The stable eval loss


def eval_timesteps(num_train_timesteps, count):
    """`count` evenly spaced timesteps of [0, num_train_timesteps), both ends left out (t = 0 is almost noiseless,
    the last one almost pure noise: neither says much about the model). A refiner passes its own range."""
    return torch.linspace(0, num_train_timesteps - 1, count + 2)[1:-1].round().long()


def eval_examples(entries, info, text_dir, aesthetic_score=None):
    """stable_eval_loss inputs from cached entries: the latent distribution's mean (no sampling, so the same every
    time), the first caption's embeddings, and SDXL's time ids. Masks are not used: eval loss is over the image."""
    identity = text_encoder_identity(info)
    shift, scale = latent_scaling(info)
    examples = []
    for entry in entries:
        text = load_tensors(text_cache_path(text_dir, entry.captions[0], identity))
        example = {"latents": (load_tensors(entry.cache_path)["mean"][None] - shift) * scale,
                   "prompt_embeds": text["prompt_embeds"][None]}
        if info.family.startswith("sdxl"):
            example["added_cond"] = {"text_embeds": text["pooled_prompt_embeds"][None],
                                     "time_ids": sdxl_time_ids(entry.transform, aesthetic_score)[None]}
        examples.append(example)
    return examples


@torch.no_grad()
def stable_eval_loss(unet, noise_scheduler, prediction_type, examples, count=8, seed=0, autocast=None,
                     timestep_range=None):
    """A loss that can be compared across steps, checkpoints and runs: every example is noised at the same
    `count` fixed timesteps with the same fixed noise (from `seed`), in eval mode, and the global RNG is left
    exactly as it was (a training run that evaluates draws what one that does not would draw).

    `autocast`: a context manager for mixed precision (training passes accelerator.autocast).
    Returns {"mean": float, "per_timestep": {t: float}}."""
    timesteps = eval_timesteps(timestep_range or noise_scheduler.config.num_train_timesteps, count)
    device, dtype = unet.device, unet.dtype
    was_training = unet.training
    unet.eval()
    totals = torch.zeros(len(timesteps))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, example in enumerate(examples):
            latents = example["latents"].float().expand(len(timesteps), -1, -1, -1)
            noise = torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
            noise = noise.expand_as(latents)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = noise_scheduler.get_velocity(latents, noise, timesteps) \
                if prediction_type == "v_prediction" else noise
            embeds = example["prompt_embeds"].expand(len(timesteps), -1, -1)
            cond = {k: v.expand(len(timesteps), -1).to(device) for k, v in example["added_cond"].items()} \
                if "added_cond" in example else None
            with (autocast or contextlib.nullcontext)():
                pred = unet(noisy.to(device, dtype), timesteps.to(device), embeds.to(device, dtype),
                            added_cond_kwargs=cond).sample
            totals += ((pred.float().cpu() - target) ** 2).mean(dim=(1, 2, 3))
    unet.train(was_training)
    per_timestep = totals / max(1, len(examples))
    return {"mean": per_timestep.mean().item(),
            "per_timestep": {int(t): value.item() for t, value in zip(timesteps, per_timestep)}}


def eval_sets(datasets, plans, split=0):
    """The entries the eval loss is measured on: every `eval` dataset's images, plus (--eval_split N) N images held
    out of the first subject dataset and removed from its plan, so they are never trained on. The held-out images
    depend on the file list alone (a fixed seed, not --seed): training and evaluate.py pick the same ones."""
    entries = [e for d in datasets if d.dataset_type == "eval" for e in plans.get(d.id, [])]
    if split:
        subject = next(d for d in datasets if d.trains and not d.is_regularisation_data)
        plan = plans[subject.id]
        if split >= len(plan):
            raise SystemExit(f"--eval_split {split}: dataset {subject.id!r} has {len(plan)} usable images; holding out "
                             f"{split} leaves none to train on (use a smaller number, or an eval dataset)")
        held = set(random.Random(0).sample(range(len(plan)), split))
        entries += [e for i, e in enumerate(plan) if i in held]
        plans[subject.id] = [e for i, e in enumerate(plan) if i not in held]
    return entries


def add_eval_args(parser):
    group = parser.add_argument_group("eval loss (fixed timesteps and noise: comparable across steps and runs)")
    group.add_argument("--eval_split", type=int, default=0,
                       help="hold out N images of the subject for the eval loss (besides any eval datasets)")
    group.add_argument("--eval_timesteps", type=int, default=8, help="evenly spaced timesteps, ends excluded")
    group.add_argument("--eval_seed", type=int, default=0, help="seed of the fixed eval noise")


# ---------------------------------------------------------------------------------------------------------------------
# 10. Scores: CLIP-T, CLIP-I and DINO, as in the DreamBooth paper

# The DreamBench prompt templates (Ruiz et al. 2023): 25 per subject kind; {instance} is e.g. "ohwx dog".
DREAMBENCH_SETTINGS = ["in the jungle", "in the snow", "on the beach", "on a cobblestone street",
                       "on top of pink fabric", "on top of a wooden floor", "with a city in the background",
                       "with a mountain in the background", "with a blue house in the background",
                       "on top of a purple rug in a forest"]
DREAMBENCH_OBJECT = ["with a wheat field in the background", "with a tree and autumn leaves in the background",
                     "with the Eiffel Tower in the background", "floating on top of water",
                     "floating in an ocean of milk", "on top of green grass with sunflowers around it",
                     "on top of a mirror", "on top of the sidewalk in a crowded street", "on top of a dirt road",
                     "on top of a white rug"]
DREAMBENCH_LIVE = ["wearing a red hat", "wearing a santa hat", "wearing a rainbow scarf",
                   "wearing a black top hat and a monocle", "in a chef outfit", "in a firefighter outfit",
                   "in a police outfit", "wearing pink glasses", "wearing a yellow shirt", "in a purple wizard outfit"]
DREAMBENCH_ATTRIBUTES = ["red", "purple", "shiny", "wet", "cube shaped"]


def dreambench_prompts(kind):
    """The 25 DreamBench prompt templates for an `object` or a `live` subject."""
    middle = DREAMBENCH_OBJECT if kind == "object" else DREAMBENCH_LIVE
    return ([f"a {{instance}} {place}" for place in DREAMBENCH_SETTINGS + middle]
            + [f"a {attribute} {{instance}}" for attribute in DREAMBENCH_ATTRIBUTES])


def fill_prompt(template, instance, class_prompt):
    """(the prompt to generate from, the prompt CLIP-T scores against): the second names the class, not the
    identifier, because CLIP does not know the identifier (the DreamBooth paper's convention)."""
    generate = template.replace("{instance}", instance).replace("{class}", class_prompt)
    score = template.replace("{instance}", class_prompt).replace("{class}", class_prompt)
    if instance and "{instance}" not in template and instance in generate:  # a literal prompt naming the subject
        score = generate.replace(instance, class_prompt)
    return generate, score


class Scorer:
    """CLIP (image and text) and DINO (ViT, CLS token) embeddings, L2-normalised, for the paper's three scores:
    CLIP-T = mean cosine(image, its prompt); CLIP-I and DINO = mean pairwise cosine(generated, real images).
    Models by local folder or hub id, safetensors only unless `allow_pickle`; `dino_model=None` skips DINO."""

    def __init__(self, clip_model, dino_model=None, device="cpu", allow_pickle=False):
        from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

        self.device = device
        clip_weights = safe_weights(clip_model, allow_pickle)
        dino_weights = safe_weights(dino_model, allow_pickle) if dino_model else {}  # both refused before either loads
        self.clip = CLIPModel.from_pretrained(clip_model, **clip_weights).to(device).eval()
        self.clip_processor = CLIPProcessor.from_pretrained(clip_model)
        self.dino = self.dino_processor = None
        if dino_model:
            self.dino = ViTModel.from_pretrained(dino_model, add_pooling_layer=False, **dino_weights).to(device).eval()
            self.dino_processor = AutoImageProcessor.from_pretrained(dino_model)

    @staticmethod
    def _normalised(output):
        features = output.pooler_output if hasattr(output, "pooler_output") else output  # transformers 5 / 4
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def clip_images(self, images):
        pixels = self.clip_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return self._normalised(self.clip.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def clip_texts(self, texts):
        tokens = self.clip_processor(text=list(texts), padding=True, truncation=True, return_tensors="pt")
        return self._normalised(self.clip.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                            attention_mask=tokens["attention_mask"].to(self.device)))

    @torch.no_grad()
    def dino_images(self, images):
        pixels = self.dino_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        cls = self.dino(pixel_values=pixels).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(cls.float(), dim=-1).cpu()

    def scores(self, images, score_prompts, real_clip, real_dino=None):
        """{"clip_t", "clip_i", "dino"} for generated `images` (each with its scoring prompt) against the real
        subject images' embeddings (from clip_images / dino_images, computed once)."""
        image_embeds = self.clip_images(images)
        result = {"clip_t": (image_embeds * self.clip_texts(score_prompts)).sum(-1).mean().item(),
                  "clip_i": (image_embeds @ real_clip.T).mean().item()}
        if self.dino is not None and real_dino is not None:
            result["dino"] = (self.dino_images(images) @ real_dino.T).mean().item()
        return result
