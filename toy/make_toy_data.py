"""The toy world: procedural pictures of simple shapes, each with the caption that describes it.

    python toy/make_toy_data.py --output_dir toy/data --count 2000 --seed 0     # PNGs + .txt captions, and a sheet
    python toy/make_toy_data.py --output_dir toy/subject --subject 5            # a DreamBench-style toy subject

A picture is one shape (circle, square, triangle, diamond) of one colour and size, at one place, on a plain
background of another colour; its caption says it, e.g. "a small red circle at the top on a blue background",
or part of it ("a red circle on a blue background", "a small shape at the top"). Everything follows from
(seed, index): the same call draws the same picture, byte for byte. The vocabulary is small on purpose
(TOY_WORDS), so a tiny text encoder with a hand-made vocabulary covers it.

A subject is not in this world: a shape painted in two colours (a striped "ohwx" shape). Its pictures vary in
size, place and background like the world's, so a DreamBooth run can recontextualise it.
"""

import argparse
import os
import random
import sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import files, images  # noqa: E402

SIZE = 64
SUPERSAMPLE = 4  # drawn 4x larger and scaled down: smooth edges
SHAPES = ["circle", "square", "triangle", "diamond"]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (25, 25, 25)}
SIZES = {"small": 0.28, "medium": 0.45, "large": 0.65}  # the shape's extent as a share of the picture
PLACES = {"at the left": (0.3, 0.5), "at the right": (0.7, 0.5), "at the top": (0.5, 0.3),
          "at the bottom": (0.5, 0.7), "in the center": (0.5, 0.5)}
TOY_WORDS = sorted({"a", "on", "background", "shape", "ohwx", "striped", *SHAPES, *COLOURS, *SIZES,
                    *" ".join(PLACES).split()})


def outline(shape, centre, extent):
    """The shape's polygon (or bounding box for a circle) in picture coordinates."""
    x, y = centre
    r = extent / 2
    if shape in ("circle", "square"):
        return [x - r, y - r, x + r, y + r]
    if shape == "triangle":
        return [(x, y - r), (x + r, y + r), (x - r, y + r)]
    return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]  # diamond


def draw(shape, colour, size, place, background, stripes=None):
    """One picture. `stripes`: a second colour painted in horizontal bands across the shape (the subject)."""
    big = SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[background])
    mask = Image.new("L", (big, big), 0)
    centre = (PLACES[place][0] * big, PLACES[place][1] * big)
    points = outline(shape, centre, SIZES[size] * big)
    pen = ImageDraw.Draw(mask)
    if shape == "circle":
        pen.ellipse(points, fill=255)
    elif shape == "square":
        pen.rectangle(points, fill=255)
    else:
        pen.polygon(points, fill=255)
    paint = Image.new("RGB", (big, big), COLOURS[colour])
    if stripes:
        bands = ImageDraw.Draw(paint)
        band = big // 8  # 8-pixel bands at 64 x 64, two latent pixels: the toy VAE blurs 4-pixel ones to orange
        for top in range(0, big, 2 * band):
            bands.rectangle([0, top, big, top + band - 1], fill=COLOURS[stripes])
    image.paste(paint, (0, 0), mask)
    return image.resize((SIZE, SIZE), Image.LANCZOS), mask.resize((SIZE, SIZE), Image.LANCZOS)


def caption(shape, colour, size, place, background, omit=()):
    """The caption of a picture; words for the attributes in `omit` are left out ("shape" stands for the shape)."""
    words = ["a", size, colour, "shape" if "shape" in omit else shape, place,
             f"on a {background} background"]
    kept = [w for w, key in zip(words, ["", "size", "colour", "", "place", "background"]) if key not in omit]
    return " ".join(kept)


# How often a training caption leaves an attribute unsaid, as people's captions do: the model learns that
# "a red circle" may be any size, anywhere, on any background, and that "a shape" is the class of all of them.
OMIT = {"shape": 0.2, "size": 0.25, "colour": 0.1, "place": 0.25, "background": 0.2}


def sample_attributes(rng):
    colour, background = rng.sample(sorted(COLOURS), 2)  # never the shape's colour as its background
    return {"shape": rng.choice(SHAPES), "colour": colour, "size": rng.choice(sorted(SIZES)),
            "place": rng.choice(sorted(PLACES)), "background": background}


def toy_sample(index, seed=0, full=False, with_mask=False):
    """(image, caption, attributes) of picture `index` of the world drawn with `seed`, and the shape's mask after
    them `with_mask`. The caption leaves some attributes unsaid (OMIT) unless `full`; the picture is the same
    either way."""
    rng = random.Random(seed * 1_000_003 + index)
    attributes = sample_attributes(rng)
    omit = [key for key in OMIT if rng.random() < OMIT[key]]
    image, mask = draw(**attributes)
    sample = image, caption(**attributes, omit=() if full else omit), attributes
    return (*sample, mask) if with_mask else sample


# The subjects: shapes in two colours, which the world never shows. "ohwx" names one in a prompt.
SUBJECTS = [("circle", "red", "yellow"), ("square", "blue", "white"), ("triangle", "green", "orange"),
            ("diamond", "purple", "yellow"), ("circle", "blue", "white"), ("square", "orange", "black"),
            ("triangle", "purple", "white"), ("diamond", "red", "green")]


def subject_samples(subject, count, seed=0):
    """[(image, mask, attributes)]: `count` pictures of subject number `subject` in varied sizes, places and
    backgrounds (the mask is the shape, for masked loss)."""
    shape, colour, stripes = SUBJECTS[subject % len(SUBJECTS)]
    rng = random.Random(10_000 + seed * 1_000_003 + subject)
    samples = []
    for _ in range(count):
        background = rng.choice([c for c in sorted(COLOURS) if c not in (colour, stripes)])
        attributes = {"shape": shape, "colour": colour, "size": rng.choice(sorted(SIZES)),
                      "place": rng.choice(sorted(PLACES)), "background": background}
        image, mask = draw(**attributes, stripes=stripes)
        samples.append((image, mask, {**attributes, "stripes": stripes}))
    return samples


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subject", type=int, default=None, help="write pictures of this subject (0-3) instead")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be 1 or more")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    pictures, labels = [], []
    if args.subject is not None:
        masks = args.output_dir.rstrip("/") + "_masks"
        for i, (image, mask, attributes) in enumerate(subject_samples(args.subject, args.count, args.seed)):
            files.save_image_atomic(image, os.path.join(args.output_dir, f"{i:04d}.png"))
            files.save_image_atomic(mask, os.path.join(masks, f"{i:04d}.png"))
            pictures.append(image)
            labels.append(f"{attributes['size']}, {attributes['background']}")
        print(f"{args.count} pictures of subject {args.subject} in {args.output_dir}, masks in {masks}")
    else:
        for i in range(args.count):
            image, text, attributes = toy_sample(i, args.seed)
            files.save_image_atomic(image, os.path.join(args.output_dir, f"{i:06d}.png"))
            files.write_text_atomic(text + "\n", os.path.join(args.output_dir, f"{i:06d}.txt"))
            pictures.append(image)
            labels.append(f"{attributes['colour']} {attributes['shape']}")
        print(f"{args.count} pictures with captions in {args.output_dir}")
    sheet = args.output_dir.rstrip("/") + "_preview.png"
    images.contact_sheet(pictures[:100], labels[:100], sheet, thumb=96)
    print(f"preview: {sheet}")


if __name__ == "__main__":
    main()
