"""Pictures: read safely and upright, fitted to aspect buckets, and laid out in grids for people to look at.

Used by every script that reads or shows pictures: data.py plans each image's bucket and crop from its header,
caches.py decodes and crops it for the VAE, make_masks.py and make_regularisation.py draw contact sheets, and
training's validation and evaluate.py draw their prompt-by-seed grids with `image_grid`.
"""

import math
import os
import random
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from common import files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# PIL refuses above 2x its MAX_IMAGE_PIXELS (~179 MP). We check the header against the same number *before*
# decoding, so a decompression bomb costs a few bytes of reading, not gigabytes of memory.
MAX_IMAGE_PIXELS = 2 * 89_478_485
MIN_IMAGE_EDGE = 16  # below this an image holds no usable detail at any bucket size
EXIF_ORIENTATION = 0x0112
ROW_LABEL_WIDTH = 160  # pixels of text at the left of a grid row (a prompt)
LINE_HEIGHT = 12  # of PIL's default font
COLUMN_LABEL_HEIGHT = 14  # a line of text over each grid column (a seed, a weight)


# ---------------------------------------------------------------------------------------------------------------------
# Reading


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


def load_mask(path):
    """A mask as 8-bit grey, upright: white = trained on, black = ignored, grey = partial weight."""
    return load_image(path).convert("L")


def image_to_tensor(image):
    """PIL RGB -> float tensor (3, H, W) in [-1, 1], what the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# Aspect buckets and crops


def round_to(x, step=64):
    return max(step, int(math.floor(x / step + 0.5)) * step)  # halves round up (Python's round() goes to even)


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


def bucket_for(width, height, dataset, step=64):
    """The training size of an image: about the requested edge/area, its aspect (or square), sides multiples of
    `step` (64 for SD 1.x/2.x/SDXL UNets; 16 for SD3 and FLUX: VAE factor 8 x patch 2).

    pixel: shorter edge = resolution. area: resolution megapixels. pixel_area: resolution px edge, as an area
    (1024 -> 1.048576 MP). With crop + crop_aspect square the bucket is square."""
    res, kind = dataset.resolution, dataset.resolution_type
    if dataset.crop and dataset.crop_aspect == "square":
        side = res if kind == "pixel" else math.sqrt(res * 1e6 if kind == "area" else res * res)
        return round_to(side, step), round_to(side, step)
    # The shorter side is a multiple of `step` near its ideal length; the longer one is the aspect-kept length
    # rounded *down*, so the bucket is never wider than the image and the cover-resize trims < step px, from the
    # long side.
    short, long = min(width, height), max(width, height)
    ideal = short * scale_to(width, height, res, kind)

    def with_long_side(short_side):
        return short_side, max(short_side, int(long * short_side / short) // step * step)

    if kind == "pixel":  # the shorter edge is the resolution
        short_side, long_side = with_long_side(round_to(ideal, step))
    else:  # of the two nearest shorter sides, the one giving the area closest to the requested one
        target_area = (ideal / short) ** 2 * width * height
        candidates = [with_long_side(max(step, math.floor(ideal / step) * step)),
                      with_long_side(math.ceil(ideal / step) * step)]
        short_side, long_side = min(candidates, key=lambda c: abs(c[0] * c[1] - target_area))
    return (long_side, short_side) if width >= height else (short_side, long_side)


def plan_transform(width, height, dataset, seed, key, step=64):
    """Every geometric step from the original image to the training tensor, decided from the size alone.

    Returns a dict (all sizes are width, height): original_size, downsampled_size (an oversized image is first
    brought to about target_downsample_size), resized_size (covers the bucket, aspect kept), crop_box
    (left, top, right, bottom in the resized image) and target_size (the bucket). A random crop is drawn from
    `seed` and `key`, so re-caching an image gives the same crop. `step`: bucket_for's."""
    down_w, down_h = width, height
    if dataset.maximum_image_size and size_measure(width, height, dataset.resolution_type) > dataset.maximum_image_size:
        target = dataset.target_downsample_size or dataset.maximum_image_size
        scale = scale_to(width, height, target, dataset.resolution_type)
        if scale < 1:
            down_w, down_h = max(1, round(width * scale)), max(1, round(height * scale))
    bucket_w, bucket_h = bucket_for(down_w, down_h, dataset, step)
    scale = max(bucket_w / down_w, bucket_h / down_h)
    resized_w, resized_h = max(bucket_w, round(down_w * scale)), max(bucket_h, round(down_h * scale))
    spare_w, spare_h = resized_w - bucket_w, resized_h - bucket_h
    style = dataset.crop_style if dataset.crop else "center"  # without crop only the < step px rounding is trimmed
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


def mask_to_latent_grid(mask, transform, factor):
    """The mask through its image's very own resize and crop (bilinear: no ringing at the edges), then averaged
    over each latent cell's factor x factor pixels. Returns (1, h, w) in [0, 1]."""
    pixels = apply_transform(mask, transform, Image.BILINEAR)
    grid = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0)[None, None]
    return torch.nn.functional.avg_pool2d(grid, factor)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Grids for people to look at


def image_grid(images, columns, cell=None, captions=None, column_labels=(), row_labels=()):
    """Many pictures in one: `images` in rows of `columns`, row by row, each shrunk (never enlarged) to fit a cell
    of `cell` = (width, height) pixels with its aspect kept (default: the first image's size).
        captions       one label under each image (file names on a contact sheet), up to three lines
        column_labels  a header over the columns; fewer labels than columns head equal groups ("raw", "EMA")
        row_labels     a label at the left of each row (the prompt of a row of seeds)
    `images` may be a generator when `captions` gives the count and `cell` the size: then one image is in memory
    at a time (a contact sheet of hundreds of class pictures)."""
    count = len(captions) if captions is not None else len(images)
    rows = max(1, math.ceil(count / columns))
    images = iter(images)
    first = None
    if cell is None:
        first = next(images)
        cell = first.size
    width, height = cell
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [wrap_label(measure, caption, width - 4) for caption in captions or []]
    caption_height = 2 + LINE_HEIGHT * max((len(lines) for lines in wrapped), default=1) if captions else 0
    left = ROW_LABEL_WIDTH if row_labels else 0
    top = COLUMN_LABEL_HEIGHT if column_labels else 0
    grid = Image.new("RGB", (left + columns * width, top + rows * (height + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images if first is None else [first, *images]):
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.copy()
            image.thumbnail((width, height))
        x, y = left + (i % columns) * width, top + (i // columns) * (height + caption_height)
        grid.paste(image, (x + (width - image.width) // 2, y + (height - image.height) // 2))
        for n, line in enumerate(wrapped[i] if captions else []):
            draw.text((x + 2, y + height + 1 + n * LINE_HEIGHT), line, fill="black")
    for i, label in enumerate(column_labels):
        draw.text((left + i * columns // len(column_labels) * width + 3, 1), label, fill="black")
    for row, label in enumerate(row_labels):
        lines = wrap_label(draw, label, left - 6, max_lines=max(1, (height - 4) // LINE_HEIGHT))
        for n, line in enumerate(lines):
            draw.text((3, top + row * (height + caption_height) + 2 + n * LINE_HEIGHT), line, fill="black")
    return grid


def enlarged(image, at_least):
    """A small picture (a toy model's 32-64 px) enlarged by a whole factor, nearest-neighbour, until its longer side
    is at least `at_least` px: each pixel becomes a sharp square rather than a blur. A bigger one is left as it is."""
    factor = math.ceil(at_least / max(image.size))
    if factor < 2:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


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


def contact_sheet(images, captions, path, thumb=160):
    """One PNG showing every image at a glance, each with its caption below: thumbnails in a near-square grid.
    `images` may be a generator (one image in memory at a time); there is one caption per image."""
    columns = max(1, math.ceil(math.sqrt(len(captions))))
    files.save_image_atomic(image_grid(images, columns, cell=(thumb, thumb), captions=captions), path)
