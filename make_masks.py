"""Masks for masked-loss training: one PNG per image, white = the subject (trained on), black = ignored.

    python make_masks.py --input_dir subject/ --output_dir subject_masks/ --text_input "person"
    python make_masks.py --input_dir subject/ --output_dir masks/ --text_input "dog, leash" \\
        --mask_padding 16 --mask_blur 4 --preview masks.png
    python make_masks.py --input_dir cutouts/ --output_dir masks/ --method alpha     # no model: the alpha channel

Reads every image under --input_dir (recursively; EXIF rotation applied). Writes OUTPUT_DIR/<same relative
path>.png: 8-bit grey, the image's own size. --method clipseg (default) segments by text with CLIPSeg
(transformers; --model is a hub id or a local folder, safetensors weights only unless --allow_pickle);
comma-separated prompts are OR-ed. --method alpha takes a cut-out PNG's alpha channel (grey edges stay grey:
partial weight). Then, in this order: --invert_mask, --on_empty (nothing found), --mask_padding (grow the white
area), --mask_blur (feather the edge).

Existing masks are kept unless --overwrite, so a re-run resumes; unreadable images are reported and skipped;
every file is written under a temporary name and renamed. --preview FILE.png draws every image with its mask
overlaid on one contact sheet. To train with the masks, add a dataset with "dataset_type": "conditioning",
"conditioning_type": "mask" and this output folder, and link it from the image dataset's "conditioning_data".
"""

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from tqdm.auto import tqdm

from common import data, files, flags, images


def mask_path_for(path, args):
    relpath = os.path.relpath(path, args.input_dir)
    return files.confined(os.path.join(args.output_dir, os.path.splitext(relpath)[0] + ".png"), args.output_dir)


def load_segmenter(args):
    from transformers import AutoProcessor, CLIPSegForImageSegmentation

    options = {"revision": args.revision, "local_files_only": args.local_files_only}
    weights = files.safe_weights(args.model, args.allow_pickle)
    try:
        processor = AutoProcessor.from_pretrained(args.model, **options)
        model = CLIPSegForImageSegmentation.from_pretrained(args.model, **options, **weights).to(args.device).eval()
    except (OSError, ValueError) as err:
        raise SystemExit(f"could not load the CLIPSeg model {args.model!r} ({err}). Give a local folder or a hub id "
                         "that is cached here, or use --method alpha for cut-out PNGs.") from None
    return processor, model


@torch.no_grad()
def segment(images, prompts, processor, model, device):
    """For each image, the CLIPSeg probability that a pixel shows any of the prompts, at the image's own size.

    Each prompt's low-resolution map is upsampled first and the maximum taken after, so thresholding the result
    is exactly the OR of the prompts' thresholded masks."""
    texts = [prompt for _ in images for prompt in prompts]
    inputs = processor(text=texts, images=[image for image in images for _ in prompts], padding=True,
                       return_tensors="pt").to(device)
    logits = model(**inputs).logits
    logits = logits.reshape(len(images), len(prompts), *logits.shape[-2:]).float()
    maps = []
    for image, image_logits in zip(images, logits):
        full = F.interpolate(torch.sigmoid(image_logits)[None], size=(image.height, image.width), mode="bilinear",
                             align_corners=False)[0]
        maps.append(full.amax(dim=0).cpu().numpy())
    return maps


def alpha_mask(path):
    """The alpha channel of an image (upright), or None if it has none. ValueError if it cannot be read."""
    images.image_size(path)  # empty files and decompression bombs are refused from the header
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                return np.asarray(image.convert("RGBA").getchannel("A"))
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot decode ({err}); the file is probably truncated or corrupt") from None
    return None


def dilate(mask, pixels):
    """Grow the white area by `pixels` in every direction (a square max filter), grey values included."""
    grid = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.max_pool2d(grid, 2 * pixels + 1, stride=1, padding=pixels)[0, 0].numpy().astype(np.uint8)


def feather(mask, pixels):
    """Blur the edge over about `pixels` (Gaussian): far from the edge the mask stays pure black or white."""
    return np.asarray(Image.fromarray(mask).filter(ImageFilter.GaussianBlur(pixels)))


def mask_fits(path, mask_path):
    """An existing mask counts as done only if it still has its image's size (the image may have been replaced)."""
    try:
        return images.image_size(mask_path) == images.image_size(path)
    except ValueError:
        return False


def overlay(image_path, mask_path, size=160):
    """A thumbnail of the image with its mask overlaid: the subject as it is, the ignored part tinted red."""
    try:
        image = images.load_image(image_path)
    except ValueError:  # unreadable: a grey tile keeps the sheet's order
        return Image.new("RGB", (size, size), (128, 128, 128))
    image.thumbnail((size, size))
    mask = images.load_mask(mask_path).resize(image.size, Image.BILINEAR)
    return Image.composite(image, Image.blend(image, Image.new("RGB", image.size, (200, 0, 0)), 0.6), mask)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=flags.HelpFormatter)
    parser.add_argument("--input_dir", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--output_dir", required=True, help="masks go here, at the images' relative paths, as .png")
    parser.add_argument("--method", default="clipseg", choices=["clipseg", "alpha"],
                        help="clipseg: find --text_input with CLIPSeg; alpha: the images' own transparency")
    parser.add_argument("--text_input", default=None, help="what to keep, e.g. 'person' or 'dog, leash' (OR-ed)")
    parser.add_argument("--model", default="CIDAS/clipseg-rd64-refined", help="CLIPSeg hub id or local folder")
    parser.add_argument("--revision", default=None, help="hub revision of the CLIPSeg model")
    flags.add_bool(parser, "--local_files_only", help="never contact the hub; use the local hub cache only")
    flags.add_allow_pickle_arg(parser)
    parser.add_argument("--threshold", type=float, default=0.4,
                        help="CLIPSeg probability above which a pixel is subject (raise it for tighter masks)")
    parser.add_argument("--mask_padding", type=int, default=0, help="grow the white area by this many pixels")
    parser.add_argument("--mask_blur", type=float, default=0, help="feather the edge over about this many pixels")
    flags.add_bool(parser, "--invert_mask", help="keep everything except what was found (e.g. --text_input background)")
    parser.add_argument("--on_empty", default="white", choices=["white", "skip", "error"],
                        help="nothing found: write a white mask (train on the whole image), write nothing, or stop")
    flags.add_bool(parser, "--overwrite", help="remake masks that exist (otherwise they are kept, so a re-run resumes)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per CLIPSeg forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where CLIPSeg runs")
    parser.add_argument("--preview", default=None, help="write a contact sheet of every image with its mask (PNG)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    prompts = [p.strip() for p in (args.text_input or "").split(",") if p.strip()]
    if args.method == "clipseg" and not prompts:
        raise SystemExit("--text_input is required with --method clipseg (e.g. --text_input \"person\"); "
                         "or use --method alpha for cut-out PNGs")
    if not os.path.isdir(args.input_dir):
        raise SystemExit(f"--input_dir {args.input_dir}: not a folder")
    if files.folders_overlap(args.output_dir, args.input_dir):
        raise SystemExit("--output_dir must be outside --input_dir (and the other way round): the masks would "
                         "become images")
    if args.mask_padding < 0 or args.mask_blur < 0 or args.batch_size < 1:
        raise SystemExit("--mask_padding and --mask_blur must be 0 or more, --batch_size 1 or more")
    if args.preview and not args.preview.lower().endswith(".png"):
        raise SystemExit(f"--preview {args.preview}: give a .png file name")

    files.remove_stale_temporaries(args.output_dir)  # a killed run's half-written masks
    paths, problems = data.find_images(args.input_dir)
    for path, reason in problems:
        print(f"skipped {path}: {reason}")
    clashes = data.stem_clashes(paths, args.input_dir)
    if clashes:
        raise SystemExit("images that differ only in their extension would get the same mask file; rename one of "
                         "each:\n  " + "\n  ".join(", ".join(group) for group in clashes))
    kept = [p for p in paths if not args.overwrite and os.path.isfile(mask_path_for(p, args))]
    for path in [p for p in kept if not mask_fits(p, mask_path_for(p, args))]:
        print(f"remaking {mask_path_for(path, args)}: it no longer has the size of {path}")
        kept.remove(path)
    kept_set = set(kept)
    todo = [p for p in paths if p not in kept_set]
    print(f"{len(paths)} images in {args.input_dir}: {len(kept)} masks exist and are kept"
          f"{'' if args.overwrite else ' (--overwrite remakes them)'}, {len(todo)} to make")
    segmenter = load_segmenter(args) if todo and args.method == "clipseg" else None

    written, unreadable, empty = 0, 0, []
    for start in tqdm(range(0, len(todo), args.batch_size), desc="making masks", unit="batch"):
        batch, loaded = [], []  # loaded: alpha channels (alpha) or RGB images (clipseg)
        for path in todo[start:start + args.batch_size]:
            try:
                loaded.append(alpha_mask(path) if args.method == "alpha" else images.load_image(path))
                batch.append(path)
            except ValueError as err:
                print(f"skipped {path}: {err}")
                unreadable += 1
        masks = loaded
        if args.method == "clipseg" and batch:
            masks = [np.where(p > args.threshold, 255, 0).astype(np.uint8)
                     for p in segment(loaded, prompts, *segmenter, args.device)]

        for path, mask in zip(batch, masks):
            # "Nothing found" is decided on what was found, before --invert_mask turns it around.
            if mask is None:
                why_empty = "it has no alpha channel"
            elif mask.max() == 0:
                why_empty = f"nothing found for {args.text_input!r} at threshold {args.threshold}" \
                    if args.method == "clipseg" else "its alpha channel is fully transparent"
            elif args.invert_mask and mask.min() == 255:
                why_empty = "what was found covers the whole image, so the inverted mask is empty"
            else:
                why_empty = None
                mask = 255 - mask if args.invert_mask else mask
            if why_empty:
                empty.append(path)
                if args.on_empty == "error":
                    raise SystemExit(f"{path}: {why_empty} (--on_empty error). Lower --threshold, change "
                                     "--text_input, or use --on_empty white / skip.")
                if args.on_empty == "skip":
                    print(f"no mask written for {path}: {why_empty} (--on_empty skip)")
                    continue
                print(f"white mask written for {path}: {why_empty} (--on_empty white: the whole image is trained on)")
                mask = np.full(images.image_size(path)[::-1] if mask is None else mask.shape, 255, np.uint8)
            if args.mask_padding:
                mask = dilate(mask, args.mask_padding)
            if args.mask_blur:
                mask = feather(mask, args.mask_blur)
            files.save_image_atomic(Image.fromarray(mask), mask_path_for(path, args))
            written += 1

    print(f"done: {written} masks written to {args.output_dir}, {len(kept)} kept, {unreadable} unreadable "
          f"images skipped, {len(empty)} with nothing found ({args.on_empty})")
    if args.preview:
        pairs = [(p, mask_path_for(p, args)) for p in paths if os.path.isfile(mask_path_for(p, args))]
        if pairs:
            images.contact_sheet((overlay(*pair) for pair in pairs),
                                 [os.path.relpath(image, args.input_dir) for image, _ in pairs], args.preview)
            print(f"preview: {args.preview} ({len(pairs)} images with their masks)")
    return written


if __name__ == "__main__":
    main()
