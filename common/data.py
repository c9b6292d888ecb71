"""Data: the data backend config, the images it names, their captions and masks, and each image's plan.

Used by cache_latents.py, train_dreambooth.py and evaluate.py, which all start with `prepare` (datasets ->
model -> plans), and by make_masks.py and rare_tokens.py (discovery). Everything here reads image headers only, never pixels, so a
typo in the data config or a missing mask costs a second, not a model load:
    load_datasets   the data config (a JSON list of datasets, or --instance_data_dir), validated, defaults filled
    plan_datasets   every image's caption(s), bucket, crop, mask and cache file (ImageEntry), bad files skipped
    eval_sets       the held-out images of the stable eval loss
"""

import dataclasses
import json
import os
import random
import re
from dataclasses import dataclass, field

from common import files, images, models
from common.flags import closest


def key(kind, default=None, choices=None):
    """A data config key: its JSON type ("str", "bool", "int", "number", "str_or_list"), default and choices."""
    return field(default=default, metadata={"kind": kind, "choices": choices})


@dataclass
class Dataset:
    """One entry of the data backend config, validated and with its defaults filled in. The fields are the keys
    a config may hold (plus is_regularization_data and crop_style "centre", the other spellings)."""

    id: str = field(metadata={"kind": "str", "choices": None})
    type: str = key("str", "local", ("local",))
    dataset_type: str = key("str", "image", ("image", "conditioning", "text_embeds", "eval"))
    instance_data_dir: str = key("str")
    caption_strategy: str = key("str", None, ("instanceprompt", "textfile", "filename"))
    instance_prompt: object = key("str_or_list")  # a string, or a list to pick from at random per sample
    resolution: float = key("number")
    resolution_type: str = key("str", None, ("pixel", "area", "pixel_area"))
    minimum_image_size: float = key("number")
    maximum_image_size: float = key("number")
    target_downsample_size: float = key("number")
    crop: bool = key("bool", False)
    crop_style: str = key("str", "center", ("center", "centre", "corner", "random"))
    crop_aspect: str = key("str", "square", ("square", "preserve"))
    repeats: int = key("int", 0)
    probability: float = key("number", 1.0)
    is_regularisation_data: bool = key("bool", False)
    conditioning_data: object = key("str_or_list")
    conditioning_type: str = key("str", None, ("mask",))
    cache_dir_vae: str = key("str")
    cache_dir: str = key("str")
    default: bool = key("bool", False)
    metadata_backend: str = key("str", "discovery", ("discovery",))

    @property
    def trains(self):
        """Images of this dataset are trained on (eval sets are held out; masks and text caches are not images)."""
        return self.dataset_type == "image"


# key: (JSON type, allowed values or None), from the fields above; the US spelling is the same switch.
DATASET_KEYS = {f.name: (f.metadata["kind"], f.metadata["choices"]) for f in dataclasses.fields(Dataset)}
DATASET_KEYS["is_regularization_data"] = DATASET_KEYS["is_regularisation_data"]
TYPE_WORDS = {"str": "a string", "bool": "true or false", "int": "a whole number", "number": "a number",
              "str_or_list": "a string or a list of strings"}


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


def as_list(value):
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


# ---------------------------------------------------------------------------------------------------------------------
# The data backend config


def validate_dataset(raw, index, source):
    where = f"{source}, dataset {raw.get('id', f'#{index + 1}')!r}" if isinstance(raw, dict) else f"{source}, entry #{index + 1}"
    if not isinstance(raw, dict):
        raise SystemExit(f"{where}: each dataset is a JSON object, got {type(raw).__name__}")
    if "id" not in raw:
        raise SystemExit(f"{where}: every dataset needs an 'id'")
    for name, value in raw.items():
        if name not in DATASET_KEYS:
            hint = closest(name, DATASET_KEYS)
            raise SystemExit(f"{where}: unknown key '{name}'" + (f"; did you mean '{hint}'?" if hint else ""))
        kind, allowed = DATASET_KEYS[name]
        if value is None and name != "id":
            continue
        if not type_ok(value, kind):
            raise SystemExit(f"{where}: '{name}' must be {TYPE_WORDS[kind]}, got {json.dumps(value)}")
        if allowed is not None and value not in allowed:
            raise SystemExit(f"{where}: '{name}' must be one of {', '.join(allowed)}; got {value!r}")
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
        raw = files.read_json(source, "--data_backend_config")
        if not isinstance(raw, list):
            raise SystemExit(f"{source}: the data backend config is a JSON list of dataset objects")
    elif args.instance_data_dir:
        source = "--instance_data_dir"
        raw = [{"id": "instance", "instance_data_dir": args.instance_data_dir, "instance_prompt": args.instance_prompt}]
    else:
        raise SystemExit("no data: give --data_backend_config FILE.json, or --instance_data_dir DIR --instance_prompt TEXT")

    if getattr(args, "with_prior_preservation", False):  # diffusers' flags for a regularisation dataset
        raw = raw + [{"id": "class", "instance_data_dir": args.class_data_dir, "instance_prompt": args.class_prompt,
                      "is_regularisation_data": True}]
    datasets = [validate_dataset(entry, i, source) for i, entry in enumerate(raw)]
    seen = {}
    for dataset in datasets:
        if dataset.id in seen:
            raise SystemExit(f"{source}: two datasets have the id {dataset.id!r}; every id must be unique")
        seen[dataset.id] = dataset
    if not any(d.trains for d in datasets):
        raise SystemExit(f"{source}: no image dataset to train on (dataset_type 'image', the default)")
    if len([d for d in datasets if d.dataset_type == "text_embeds" and d.default]) > 1:
        raise SystemExit(f"{source}: more than one text_embeds dataset has \"default\": true")
    for dataset in datasets:
        check_mask_link(dataset, seen, source)

    cache_root = args.cache_dir or os.path.join(args.output_dir, "cache")
    for dataset in datasets:
        if dataset.resolution is None:
            dataset.resolution = args.resolution
        if dataset.resolution_type is None:
            dataset.resolution_type = args.resolution_type
        if dataset.cache_dir_vae is None:
            dataset.cache_dir_vae = os.path.join(cache_root, "vae", files.safe_folder_name(dataset.id))
    refuse_outputs_among_data(datasets, args, source)
    return datasets


def make_class_images(args, say=print):
    """--with_prior_preservation: the base model draws what --class_data_dir lacks of --num_class_images, by
    make_regularisation.py (its file names and manifest, so a re-run adds only what is missing)."""
    import subprocess
    import sys

    folder = args.class_data_dir
    have = [n for n in os.listdir(folder) if n.lower().endswith(images.IMAGE_EXTENSIONS)] \
        if os.path.isdir(folder) else []
    if len(have) >= args.num_class_images:
        return
    if have and not os.path.isfile(os.path.join(folder, ".regularisation.json")):
        raise SystemExit(f"--class_data_dir {folder}: {len(have)} images, fewer than --num_class_images "
                         f"{args.num_class_images}, and not made by make_regularisation.py (which adds only to its own "
                         "folders): add images, lower --num_class_images, or give an empty folder to have them made")
    say(f"--with_prior_preservation: {folder} holds {len(have)} of {args.num_class_images} class images; the base "
        "model makes the rest (make_regularisation.py)")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "make_regularisation.py")
    command = [sys.executable, script, "--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
               "--class_prompt", args.class_prompt, "--num_images", str(args.num_class_images), "--output_dir", folder]
    for flag in ("revision", "variant", "single_file_config", "pretrained_vae_model_name_or_path",
                 *(f"text_encoder_{i}_precision" for i in (1, 2, 3))):
        if getattr(args, flag, None) not in (None, "no_change"):
            command += [f"--{flag}", str(getattr(args, flag))]
    command += ["--local_files_only"] * bool(args.local_files_only) + ["--allow_pickle"] * bool(args.allow_pickle)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"--with_prior_preservation: making the class images in {folder} failed (the reason is above)")


def check_mask_link(dataset, seen, source):
    """A mask dataset says it holds masks; an image dataset links at most one, and keeps its masks elsewhere."""
    if dataset.dataset_type == "conditioning" and dataset.conditioning_type != "mask":
        raise SystemExit(f"{source}, dataset {dataset.id!r}: a conditioning dataset needs "
                         "\"conditioning_type\": \"mask\" (masks are the only conditioning this trainer uses)")
    linked = as_list(dataset.conditioning_data)
    for other in linked:
        if other not in seen or seen[other].dataset_type != "conditioning":
            raise SystemExit(f"{source}, dataset {dataset.id!r}: conditioning_data {other!r} is not the id of a "
                             "dataset with \"dataset_type\": \"conditioning\"")
    for other in linked:
        if files.folders_overlap(dataset.instance_data_dir, seen[other].instance_data_dir):
            raise SystemExit(f"{source}, dataset {dataset.id!r}: its images and its masks ({other!r}) share a "
                             "folder (or one holds the other), so masks would be trained on as images: keep them "
                             "in separate folders")
    if len(linked) > 1:
        raise SystemExit(f"{source}, dataset {dataset.id!r}: link one mask dataset in conditioning_data, not "
                         f"{len(linked)}")


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
            if folder and files.inside(folder, dataset.instance_data_dir):
                raise SystemExit(f"{source}: {what} ({folder}) lies inside the images of dataset {dataset.id!r} "
                                 f"({dataset.instance_data_dir}); outputs would be mixed with the pictures. Choose a "
                                 "folder outside it.")


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
# Discovery and captions


def find_images(folder):
    """Image files under `folder`, recursively and sorted; hidden files skipped; symlink loops reported, not followed.

    Returns (paths, problems) where problems is a list of (path, reason)."""
    found, problems, visited = [], [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            problems.append((root, f"symlink loop: {real} was already searched; not followed again"))
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name.lower().endswith(images.IMAGE_EXTENSIONS):
                found.append(os.path.join(root, name))
    return found, problems


def stem_clashes(paths, root):
    """Groups of images that share a relative path without extension (a.jpg and a.png): a mask pairs by that name,
    so such images cannot each have their own."""
    groups = {}
    for path in paths:
        groups.setdefault(os.path.splitext(os.path.relpath(path, root))[0], []).append(path)
    return [group for group in groups.values() if len(group) > 1]


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
# Plans: what each image becomes


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
    return files.confined(os.path.join(dataset.cache_dir_vae, f"{relpath}-{width}x{height}.safetensors"),
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


def size_problem(path, mask, dataset):
    """Why an image (and its mask) cannot be trained on, from their headers, or None with its (width, height)."""
    try:
        width, height = images.image_size(path)
    except ValueError as err:
        return str(err), None
    if min(width, height) < images.MIN_IMAGE_EDGE:
        return f"{width}x{height} is too small to train on (under {images.MIN_IMAGE_EDGE} px)", None
    measure = images.size_measure(width, height, dataset.resolution_type)
    if dataset.minimum_image_size and measure < dataset.minimum_image_size:
        return (f"{width}x{height} is below minimum_image_size {dataset.minimum_image_size:g} "
                f"({dataset.resolution_type}: {measure:.4g})"), None
    if mask:
        try:
            mask_size = images.image_size(mask)
        except ValueError as err:
            return f"its mask {mask}: {err}", None
        if mask_size != (width, height):
            return (f"its mask {mask} is {mask_size[0]}x{mask_size[1]}, the image {width}x{height}; a mask must have "
                    "its image's size (remake it)"), None
    return None, (width, height)


def plan_dataset(dataset, seed, mask_dataset=None, step=64):
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
        problem, size = size_problem(path, masks.get(path), dataset)
        if problem:
            skipped.append((path, problem))
            continue
        relpath = os.path.relpath(path, dataset.instance_data_dir)
        transform = images.plan_transform(*size, dataset, seed, f"{dataset.id}/{relpath}", step)
        entries.append(ImageEntry(
            dataset_id=dataset.id, path=path, relpath=relpath, captions=captions_for(path, dataset),
            transform=transform, cache_path=vae_cache_path(dataset, relpath, transform),
            is_regularisation=dataset.is_regularisation_data, mask_path=masks.get(path),
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


def plan_datasets(datasets, seed, print_fn=print, step=64):
    """plan_dataset for every image dataset (buckets in multiples of `step` px), printing each skipped file with
    its reason."""
    plans = {}
    for dataset in datasets:
        if dataset.dataset_type not in ("image", "eval"):
            continue
        entries, skipped = plan_dataset(dataset, seed, mask_dataset_of(dataset, datasets), step)
        for path, reason in skipped:
            print_fn(f"skipped {path}: {reason}")
        if not entries:
            raise SystemExit(f"dataset {dataset.id!r} ({dataset.instance_data_dir}) has no usable images"
                             + (f": all {len(skipped)} were skipped (reasons above)" if skipped else ": the folder holds no "
                                f"{'/'.join(e[1:] for e in images.IMAGE_EXTENSIONS)} files"))
        plans[dataset.id] = entries
    return plans


def prepare(args, print_fn=print):
    """What cache_latents.py, train_dreambooth.py and evaluate.py do first: read the data config, find the model
    and its family (configs only: no weights), and plan every image at the model's native size unless a
    resolution is given. Returns (datasets, model info, {dataset id: [ImageEntry]})."""
    datasets = load_datasets(args)
    for dataset in datasets:
        if dataset.caption_strategy == "filename" and dataset.instance_prompt is None and dataset.trains:
            print_fn(f"warning: dataset {dataset.id!r} has no instance_prompt, so its captions come from the file "
                     "names (ohwx_dog_03.jpg -> \"ohwx dog\"); give --instance_prompt (or \"instance_prompt\" / "
                     "\"caption_strategy\" in the data config) if that is not what you meant")
    info = models.resolve_model(args)
    for dataset in datasets:
        dataset.resolution = dataset.resolution or info.native_resolution
    return datasets, info, plan_datasets(datasets, crop_seed(args), print_fn, info.bucket_step)


def subject_dataset(datasets):
    """The subject: the first dataset trained on that is not regularisation data."""
    subject = next((d for d in datasets if d.trains and not d.is_regularisation_data), None)
    if subject is None:
        raise SystemExit("every image dataset is regularisation data: validation, scores and --eval_split need the "
                         "subject's pictures in a dataset without \"is_regularisation_data\": true")
    return subject


def eval_sets(datasets, plans, split=0):
    """The entries the eval loss is measured on: every `eval` dataset's images, plus (--eval_split N) N images held
    out of the subject dataset and removed from its plan, so they are never trained on. The held-out images
    depend on the file list alone (a fixed seed, not --seed): training and evaluate.py pick the same ones."""
    entries = [e for d in datasets if d.dataset_type == "eval" for e in plans.get(d.id, [])]
    if split:
        subject = subject_dataset(datasets)
        plan = plans[subject.id]
        if split >= len(plan):
            raise SystemExit(f"--eval_split {split}: dataset {subject.id!r} has {len(plan)} usable images; holding out "
                             f"{split} leaves none to train on (use a smaller number, or an eval dataset)")
        held = set(random.Random(0).sample(range(len(plan)), split))
        entries += [e for i, e in enumerate(plan) if i in held]
        plans[subject.id] = [e for i, e in enumerate(plan) if i not in held]
    return entries


def report_mix(args, datasets, weights, plans, say):
    """With regularisation data: how many samples of each kind an epoch of the batch stream holds (`weights`: each
    dataset's share of the batches), and a warning when under half the batches show the subject."""
    counts, shares = {True: 0, False: 0}, {True: 0.0, False: 0.0}
    for dataset, weight in zip(datasets, weights):
        counts[dataset.is_regularisation_data] += len(plans[dataset.id]) * (dataset.repeats + 1)
        shares[dataset.is_regularisation_data] += weight
    if not counts[True]:
        return
    instance_share = shares[False] / sum(shares.values())
    say(f"an epoch holds {counts[False]} instance and {counts[True]} regularisation samples; {instance_share:.0%} of "
        f"batches are instance batches (prior loss: {args.prior_loss_target} target, weight "
        f"{args.prior_loss_weight:g})")
    if instance_share < 0.5:
        fix = "raise the subject's repeats (or its probability)" if args.data_sampling == "auto" else \
            "raise the subject's probability (with --data_sampling uniform, repeats do not change the mix)"
        say(f"warning: only {instance_share:.0%} of batches show the subject; the usual advice is at least half "
            f"(e.g. 10 photos beside 1000 class images want repeats >= 100): {fix}")
