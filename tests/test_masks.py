"""Masked loss: make_masks.py, masks that follow their images through resize and crop into the latent cache,
and a loss that gives the masked-out region no gradient."""

import os

import numpy as np
import pytest
import torch
from conftest import resolution_for, train_argv, write_json
from PIL import Image, ImageDraw

import cache_latents
from common import adapters, data, files, images, models
import make_masks
import train_dreambooth


# ---------------------------------------------------------------------------------------------------------------------
# make_masks.py


def draw_square(path, size, box, mode="RGB", fill=(220, 30, 30), background=(20, 20, 120)):
    """An image with a filled rectangle `box` = (left, top, right, bottom), inclusive as PIL draws it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.new(mode, size, background)
    ImageDraw.Draw(image).rectangle(box, fill=fill)
    image.save(path)
    return path


def cutout(path, size, box):
    """A cut-out PNG: transparent everywhere but an opaque square."""
    return draw_square(path, size, box, mode="RGBA", fill=(200, 40, 40, 255), background=(0, 0, 0, 0))


def masks_argv(tiny_clipseg, input_dir, output_dir, *extra):
    return ["--input_dir", str(input_dir), "--output_dir", str(output_dir), "--model", tiny_clipseg,
            "--local_files_only", "--text_input", "dog", *map(str, extra)]


def read(path):
    return np.asarray(Image.open(path))


def test_clipseg_masks_have_each_images_size_at_its_relative_path(tiny_clipseg, tmp_path):
    draw_square(str(tmp_path / "in" / "a.jpg"), (100, 80), (10, 10, 40, 40))
    draw_square(str(tmp_path / "in" / "sub" / "b.png"), (64, 96), (5, 5, 30, 60))
    draw_square(str(tmp_path / "in" / "c.webp"), (50, 50), (0, 0, 20, 20))
    written = make_masks.main(masks_argv(tiny_clipseg, tmp_path / "in", tmp_path / "out", "--batch_size", "2"))
    assert written == 3
    for name, size in (("a.png", (100, 80)), ("sub/b.png", (64, 96)), ("c.png", (50, 50))):
        mask = Image.open(tmp_path / "out" / name)
        assert mask.size == size and mask.mode == "L"
        assert set(np.unique(np.asarray(mask))) <= {0, 255}  # thresholded: subject or not


def test_comma_separated_prompts_are_or_ed(tiny_clipseg, tmp_path):
    image_path = draw_square(str(tmp_path / "in" / "a.png"), (96, 64), (10, 10, 50, 40))
    processor, model = make_masks.load_segmenter(make_masks.parse_args(masks_argv(tiny_clipseg, tmp_path, tmp_path / "x")))
    maps = make_masks.segment([images.load_image(image_path)], ["dog", "red toy"], processor, model, "cpu")
    threshold = float(np.median(maps[0]))  # a threshold that makes both masks partial
    results = {}
    for text in ("dog", "red toy", "dog, red toy"):
        out = tmp_path / text.replace(", ", "+")
        argv = masks_argv(tiny_clipseg, tmp_path / "in", out, "--threshold", threshold, "--on_empty", "skip")
        argv[argv.index("--text_input") + 1] = text
        make_masks.main(argv)
        results[text] = read(out / "a.png") > 0
    assert np.array_equal(results["dog, red toy"], results["dog"] | results["red toy"])
    assert 0 < results["dog, red toy"].mean() < 1


def test_threshold_and_the_on_empty_choices(tiny_clipseg, tmp_path, capsys):
    draw_square(str(tmp_path / "in" / "a.png"), (64, 64), (10, 10, 30, 30))
    draw_square(str(tmp_path / "in" / "b.png"), (48, 64), (10, 10, 30, 30))
    make_masks.main(masks_argv(tiny_clipseg, tmp_path / "in", tmp_path / "all", "--threshold", "0"))
    assert read(tmp_path / "all" / "a.png").min() == 255  # every probability is above 0
    # Threshold 1: nothing is found anywhere.
    make_masks.main(masks_argv(tiny_clipseg, tmp_path / "in", tmp_path / "white", "--threshold", "1"))
    assert "white mask written for" in capsys.readouterr().out
    assert read(tmp_path / "white" / "b.png").shape == (64, 48) and read(tmp_path / "white" / "b.png").min() == 255
    make_masks.main(masks_argv(tiny_clipseg, tmp_path / "in", tmp_path / "skip", "--threshold", "1", "--on_empty", "skip"))
    assert "no mask written for" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "skip" / "a.png")
    with pytest.raises(SystemExit, match="a.png: nothing found for 'dog' at threshold 1.0"):
        make_masks.main(masks_argv(tiny_clipseg, tmp_path / "in", tmp_path / "error", "--threshold", "1",
                                   "--on_empty", "error"))
    assert not os.path.exists(tmp_path / "error") or os.listdir(tmp_path / "error") == []


def test_alpha_method_reproduces_the_alpha_channel(tmp_path):
    alpha = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))  # a ramp: grey values must survive
    image = Image.new("RGBA", (64, 48), (10, 200, 30, 0))
    image.putalpha(Image.fromarray(alpha))
    os.makedirs(tmp_path / "in")
    image.save(tmp_path / "in" / "ramp.png")
    make_masks.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"), "--method", "alpha"])
    assert np.array_equal(read(tmp_path / "out" / "ramp.png"), alpha)


def test_an_image_without_alpha_follows_on_empty(tmp_path, capsys):
    draw_square(str(tmp_path / "in" / "opaque.png"), (40, 30), (5, 5, 10, 10))
    make_masks.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"), "--method", "alpha"])
    assert "it has no alpha channel" in capsys.readouterr().out
    assert read(tmp_path / "out" / "opaque.png").shape == (30, 40) and read(tmp_path / "out" / "opaque.png").min() == 255


def white_box(mask):
    rows, columns = np.nonzero(mask == 255)
    return columns.min(), rows.min(), columns.max(), rows.max()


def test_padding_grows_the_white_area_by_the_requested_pixels(tmp_path):
    cutout(str(tmp_path / "in" / "a.png"), (80, 70), (20, 25, 39, 44))  # a 20 x 20 square
    make_masks.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"), "--method", "alpha",
                     "--mask_padding", "5"])
    mask = read(tmp_path / "out" / "a.png")
    assert white_box(mask) == (15, 20, 44, 49)
    assert (mask == 255).sum() == 30 * 30 and (mask == 0).sum() == 80 * 70 - 900


def test_blur_makes_grey_values_only_near_the_edge(tmp_path):
    cutout(str(tmp_path / "in" / "a.png"), (100, 100), (30, 30, 69, 69))
    make_masks.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"), "--method", "alpha",
                     "--mask_blur", "3"])
    mask = read(tmp_path / "out" / "a.png")
    rows, columns = np.mgrid[0:100, 0:100]
    # Distance (in the max norm) from each pixel to the square's edge.
    inside = np.maximum(np.abs(columns - 49.5), np.abs(rows - 49.5))
    distance = np.abs(inside - 20)
    grey = (mask > 0) & (mask < 255)
    assert grey.sum() > 100  # a real feather
    assert distance[grey].max() <= 12  # about 3 sigma of a radius-3 blur, never further
    assert (mask[distance > 12] % 255 == 0).all()
    assert mask[50, 50] == 255 and mask[2, 2] == 0


def test_invert_mask_swaps_subject_and_background(tmp_path):
    cutout(str(tmp_path / "in" / "a.png"), (40, 40), (10, 10, 19, 19))
    make_masks.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"), "--method", "alpha",
                     "--invert_mask"])
    mask = read(tmp_path / "out" / "a.png")
    assert mask[15, 15] == 0 and mask[0, 0] == 255 and (mask == 0).sum() == 100


def test_existing_masks_are_kept_unless_overwrite(tmp_path):
    cutout(str(tmp_path / "in" / "a.png"), (40, 40), (10, 10, 19, 19))
    cutout(str(tmp_path / "in" / "b.png"), (40, 40), (5, 5, 19, 19))
    argv = ["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"), "--method", "alpha"]
    assert make_masks.main(argv) == 2
    os.remove(tmp_path / "out" / "b.png")  # as if the first run had been killed before b
    before = os.stat(tmp_path / "out" / "a.png").st_mtime_ns
    assert make_masks.main(argv) == 1  # resumes: only the missing mask
    assert os.stat(tmp_path / "out" / "a.png").st_mtime_ns == before
    assert make_masks.main(argv + ["--overwrite"]) == 2


def test_unreadable_images_are_reported_and_the_rest_masked(tmp_path, capsys):
    cutout(str(tmp_path / "in" / "good.png"), (40, 40), (10, 10, 19, 19))
    good = open(tmp_path / "in" / "good.png", "rb").read()
    (tmp_path / "in" / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "in" / "text.png").write_text("not an image")
    assert make_masks.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                            "--method", "alpha"]) == 1
    out = capsys.readouterr().out
    assert f"skipped {tmp_path / 'in' / 'cut.png'}" in out and f"skipped {tmp_path / 'in' / 'text.png'}" in out
    assert sorted(os.listdir(tmp_path / "out")) == ["good.png"]  # nothing half-written


def test_preview_is_a_contact_sheet_of_every_image(tmp_path):
    for i in range(5):
        cutout(str(tmp_path / "in" / f"{i}.png"), (60, 40), (10, 10, 30, 30))
    make_masks.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"), "--method", "alpha",
                     "--preview", str(tmp_path / "sheet.png")])
    sheet = Image.open(tmp_path / "sheet.png").convert("RGB")
    assert sheet.size == (3 * 160, 2 * 174)  # 5 images: 3 columns, 2 rows of 160 px thumbnails + a label line
    first = np.asarray(sheet)[:160, :160]
    assert (first[..., 0] > 150).any() and (first[..., 2] > 100).sum() < (first[..., 0] > 100).sum()


def test_long_labels_wrap_inside_their_thumbnail(tmp_path):
    prompts = ["a large ohwx shape at the left", "a ohwx shape on a black background", "a ohwx shape", "x" * 60]
    images.contact_sheet([Image.new("RGB", (64, 64), "red")] * 4, prompts, str(tmp_path / "sheet.png"), thumb=96)
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("L"))
    assert sheet.shape == (2 * (96 + 2 + 2 * 12), 2 * 96)  # two label lines: the longest prompts need two
    label = sheet[96:96 + 26, :96]
    assert (label < 128).any() and (label[:, -2:] >= 128).all()  # text in the first cell, clear of the next
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for prompt in prompts:
        lines = images.wrap_label(measure, prompt, 92)
        assert all(measure.textlength(line) <= 92 for line in lines)
        assert " ".join(lines) == prompt or lines[-1].endswith("..")


def test_bad_arguments_are_refused(tiny_clipseg, tmp_path):
    os.makedirs(tmp_path / "in")
    with pytest.raises(SystemExit, match="--text_input is required"):
        make_masks.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out")])
    for output in (tmp_path / "in", tmp_path / "in" / "masks", tmp_path):  # same, inside, around
        with pytest.raises(SystemExit, match="must be outside --input_dir"):
            make_masks.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(output), "--method", "alpha"])
    with pytest.raises(SystemExit, match="--batch_size 1 or more"):
        make_masks.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "o"), "--method", "alpha",
                         "--batch_size", "0"])
    with pytest.raises(SystemExit, match="give a .png file name"):
        make_masks.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "o"), "--method", "alpha",
                         "--preview", str(tmp_path / "sheet")])


def test_images_differing_only_in_extension_are_refused(tmp_path):
    cutout(str(tmp_path / "in" / "a.png"), (40, 40), (0, 0, 9, 9))
    cutout(str(tmp_path / "in" / "a.webp"), (40, 40), (30, 30, 39, 39))
    with pytest.raises(SystemExit, match="differ only in their extension"):
        make_masks.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"), "--method", "alpha"])
    assert not os.path.exists(tmp_path / "out")


def test_invert_with_on_empty_judges_what_was_found(tmp_path, capsys):
    cutout(str(tmp_path / "in" / "full.png"), (20, 20), (0, 0, 19, 19))  # the subject fills the image
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "in" / "none.png")  # nothing to find
    argv = ["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"), "--method", "alpha",
            "--invert_mask", "--on_empty", "skip"]
    make_masks.main(argv)
    out = capsys.readouterr().out
    assert "full.png: what was found covers the whole image, so the inverted mask is empty" in out
    assert "none.png: its alpha channel is fully transparent" in out
    assert not os.path.isdir(tmp_path / "out") or os.listdir(tmp_path / "out") == []


def test_a_kept_mask_that_no_longer_fits_its_image_is_remade(tmp_path, capsys):
    cutout(str(tmp_path / "in" / "a.png"), (40, 40), (10, 10, 19, 19))
    argv = ["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"), "--method", "alpha"]
    make_masks.main(argv)
    cutout(str(tmp_path / "in" / "a.png"), (80, 60), (10, 10, 19, 19))  # the photo was replaced
    assert make_masks.main(argv) == 1
    assert "no longer has the size of" in capsys.readouterr().out
    assert Image.open(tmp_path / "out" / "a.png").size == (80, 60)


# ---------------------------------------------------------------------------------------------------------------------
# Masks in the data config and the latent cache


def masked_data_config(tmp_path, image_dir, mask_dir, **image_keys):
    return write_json(tmp_path / "data.json", [
        {"id": "subject", "instance_data_dir": str(image_dir), "instance_prompt": "a photo of ohwx toy",
         "conditioning_data": "masks", "cache_dir_vae": str(tmp_path / "vae"), **image_keys},
        {"id": "masks", "dataset_type": "conditioning", "conditioning_type": "mask", "instance_data_dir": str(mask_dir)},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(tmp_path / "text")},
    ])


def cache_argv(model, config, tmp_path, *extra):
    return ["--pretrained_model_name_or_path", model, "--data_backend_config", config, "--output_dir",
            str(tmp_path / "out"), "--seed", "5", *extra]


def cell_coverage(box, transform, factor):
    """Independently of the cache code: the fraction of each latent cell that the transformed square covers.
    `box` is (left, top, right, bottom) in original pixels, right/bottom exclusive."""
    res_w, res_h = transform["resized_size"]
    orig_w, orig_h = transform["original_size"]
    scale_x, scale_y = res_w / orig_w, res_h / orig_h  # end to end, whatever the downsample step did in between
    left, top = transform["crop_box"][:2]
    x0, x1 = box[0] * scale_x - left, box[2] * scale_x - left
    y0, y1 = box[1] * scale_y - top, box[3] * scale_y - top
    width, height = transform["target_size"]
    cells = np.zeros((height // factor, width // factor))
    for row in range(cells.shape[0]):
        for column in range(cells.shape[1]):
            overlap_x = max(0.0, min(x1, (column + 1) * factor) - max(x0, column * factor))
            overlap_y = max(0.0, min(y1, (row + 1) * factor) - max(y0, row * factor))
            cells[row, column] = overlap_x * overlap_y / factor ** 2
    return cells


@pytest.mark.parametrize("variant", ["plain", "downsampled", "exif-rotated"])
@pytest.mark.parametrize("size,box", [((300, 200), (150, 40, 230, 140)), ((200, 300), (30, 160, 110, 260))],
                         ids=["landscape", "portrait"])
@pytest.mark.parametrize("crop_style", ["random", "center", "corner"])
def test_the_cached_mask_follows_its_image_through_resize_and_crop(tiny_model, tmp_path, crop_style, size, box,
                                                                   variant):
    square = (box[0], box[1], box[2] - 1, box[3] - 1)
    if variant == "exif-rotated":  # stored on its side, shown upright by its EXIF orientation; the mask is upright
        upright = Image.new("RGB", size, (20, 20, 120))
        ImageDraw.Draw(upright).rectangle(square, fill=(220, 30, 30))
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
        os.makedirs(tmp_path / "images")
        upright.transpose(Image.ROTATE_90).save(tmp_path / "images" / "a.jpg", exif=exif, quality=95)
    else:
        draw_square(str(tmp_path / "images" / "a.png"), size, square)
    draw_square(str(tmp_path / "masks" / "a.png"), size, square, mode="L", fill=255, background=0)
    extra = {"maximum_image_size": 160, "target_downsample_size": 140} if variant == "downsampled" else {}
    config = masked_data_config(tmp_path, tmp_path / "images", tmp_path / "masks", resolution=128, crop=True,
                                crop_style=crop_style, crop_aspect="square", **extra)
    [entry] = cache_latents.main(cache_argv(tiny_model("sd1"), config, tmp_path))["subject"]
    transform = entry.transform
    assert transform["target_size"] == [128, 128] and transform["resized_size"] != [128, 128]
    assert transform["original_size"] == list(size)
    assert (transform["downsampled_size"] != list(size)) == (variant == "downsampled")
    cached = files.load_tensors(entry.cache_path)["mask"]
    assert cached.shape == (1, 16, 16)
    expected = cell_coverage(box, transform, 8)
    # A one-pixel drift would move an edge cell by 1/8; bilinear resampling (twice when downsampled) stays well
    # below that.
    assert np.abs(cached[0].numpy() - expected).max() < 0.05
    assert abs(cached.sum().item() - expected.sum()) < 0.5
    # The image's red square lies where the cached mask is white: the image's own latent-cell colours agree.
    image = torch.from_numpy(np.asarray(images.apply_transform(images.load_image(entry.path), transform),
                                        dtype=np.float32))
    red = ((image[..., 0] > 120) & (image[..., 2] < 100)).float()[None, None]
    red_cells = torch.nn.functional.avg_pool2d(red, 8)[0]
    assert (red_cells - cached).abs().max() < 0.15


def test_masks_pair_by_relative_path_with_any_extension(tmp_path):
    draw_square(str(tmp_path / "images" / "sub" / "a.jpg"), (64, 64), (0, 0, 10, 10))
    draw_square(str(tmp_path / "images" / "b.png"), (64, 64), (0, 0, 10, 10))
    draw_square(str(tmp_path / "masks" / "sub" / "a.png"), (64, 64), (0, 0, 10, 10), mode="L", fill=255, background=0)
    draw_square(str(tmp_path / "masks" / "b.jpg"), (64, 64), (0, 0, 10, 10), mode="L", fill=255, background=0)
    args = train_dreambooth.parse_args(["--data_backend_config", masked_data_config(tmp_path, tmp_path / "images",
                                                                                    tmp_path / "masks"),
                                        "--resolution", "64"])
    plans = data.plan_datasets(data.load_datasets(args), 0)
    assert {os.path.relpath(e.mask_path, tmp_path / "masks") for e in plans["subject"]} == {"sub/a.png", "b.jpg"}
    assert "masks" not in plans  # a mask dataset is not trained on


def test_masks_that_cannot_be_told_apart_from_images_are_refused(tmp_path):
    draw_square(str(tmp_path / "images" / "a.jpg"), (64, 64), (0, 0, 10, 10))
    draw_square(str(tmp_path / "images" / "masks" / "a.png"), (64, 64), (0, 0, 10, 10), mode="L", fill=255, background=0)
    for masks in (tmp_path / "images", tmp_path / "images" / "masks"):  # the same folder, or inside it
        args = train_dreambooth.parse_args(["--data_backend_config", masked_data_config(tmp_path, tmp_path / "images",
                                                                                        masks)])
        with pytest.raises(SystemExit, match="share a folder \\(or one holds the other\\)"):
            data.load_datasets(args)
    os.rename(tmp_path / "images" / "masks", tmp_path / "masks")
    draw_square(str(tmp_path / "images" / "a.png"), (64, 64), (0, 0, 10, 10))
    args = train_dreambooth.parse_args(["--data_backend_config", masked_data_config(tmp_path, tmp_path / "images",
                                                                                    tmp_path / "masks")])
    with pytest.raises(SystemExit, match="differ only in their extension would share one mask"):
        data.plan_datasets(data.load_datasets(args), 0)


def test_missing_masks_are_all_listed_before_any_model_work(tiny_model, tmp_path, monkeypatch):
    for name in ("a.jpg", "b.png", "c.png"):
        draw_square(str(tmp_path / "images" / name), (64, 64), (0, 0, 10, 10))
    draw_square(str(tmp_path / "masks" / "a.png"), (64, 64), (0, 0, 10, 10), mode="L", fill=255, background=0)

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the missing masks were reported")

    monkeypatch.setattr(models, "load_component", no_models)
    config = masked_data_config(tmp_path, tmp_path / "images", tmp_path / "masks")
    with pytest.raises(SystemExit) as raised:
        train_dreambooth.main(["--pretrained_model_name_or_path", tiny_model("sd1"), "--data_backend_config", config,
                               "--output_dir", str(tmp_path / "out")])
    message = str(raised.value)
    assert "2 image(s) have no mask" in message
    assert str(tmp_path / "masks" / "b.png") in message and str(tmp_path / "masks" / "c.png") in message
    assert str(tmp_path / "masks" / "a.png") not in message


def test_a_mask_of_the_wrong_size_skips_its_image_with_the_reason(tiny_model, tmp_path, capsys):
    draw_square(str(tmp_path / "images" / "a.png"), (64, 64), (0, 0, 10, 10))
    draw_square(str(tmp_path / "images" / "b.png"), (64, 64), (0, 0, 10, 10))
    draw_square(str(tmp_path / "masks" / "a.png"), (64, 64), (0, 0, 10, 10), mode="L", fill=255, background=0)
    draw_square(str(tmp_path / "masks" / "b.png"), (32, 32), (0, 0, 10, 10), mode="L", fill=255, background=0)
    plans = cache_latents.main(cache_argv(tiny_model("sd1"), masked_data_config(tmp_path, tmp_path / "images",
                                                                                tmp_path / "masks"), tmp_path))
    assert [os.path.basename(e.path) for e in plans["subject"]] == ["a.png"]
    assert f"its mask {tmp_path / 'masks' / 'b.png'} is 32x32, the image 64x64" in capsys.readouterr().out


def test_touching_a_mask_makes_its_entry_stale_and_all_black_masks_are_reported(tiny_model, tmp_path, capsys):
    for name in ("a.png", "b.png"):
        draw_square(str(tmp_path / "images" / name), (64, 64), (0, 0, 10, 10))
    draw_square(str(tmp_path / "masks" / "a.png"), (64, 64), (0, 0, 30, 30), mode="L", fill=255, background=0)
    Image.new("L", (64, 64), 0).save(tmp_path / "masks" / "b.png")
    argv = cache_argv(tiny_model("sd1"), masked_data_config(tmp_path, tmp_path / "images", tmp_path / "masks"), tmp_path)
    plans = cache_latents.main(argv)
    assert f"the mask {tmp_path / 'masks' / 'b.png'} of {tmp_path / 'images' / 'b.png'} is all black" in \
        capsys.readouterr().out
    before = {e.cache_path: os.stat(e.cache_path).st_mtime_ns for e in plans["subject"]}
    draw_square(str(tmp_path / "masks" / "a.png"), (64, 64), (0, 0, 40, 40), mode="L", fill=255, background=0)
    plans = cache_latents.main(argv)
    changed = [path for path, mtime in before.items() if os.stat(path).st_mtime_ns != mtime]
    assert changed == [plans["subject"][0].cache_path]
    assert files.load_tensors(changed[0])["mask"].sum() > 5  # the new, bigger mask


# ---------------------------------------------------------------------------------------------------------------------
# The loss


def test_the_masked_out_region_gets_no_gradient():
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, generator=generator, requires_grad=True)
    target = torch.randn(2, 4, 8, 8, generator=generator)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :, :4] = 1.0  # left half trained, right half ignored
    loss = train_dreambooth.masked_mse(pred, target, mask)
    loss.sum().backward()
    assert torch.equal(pred.grad[..., 4:], torch.zeros_like(pred.grad[..., 4:]))
    assert (pred.grad[..., :4] != 0).all()
    # Normalised, the loss of a half mask is the loss of the white half alone; unnormalised, half of it.
    white_half = ((pred - target) ** 2)[..., :4].mean(dim=(1, 2, 3))
    assert torch.allclose(loss, white_half)
    assert torch.allclose(train_dreambooth.masked_mse(pred, target, mask, normalize=False), white_half / 2)
    # Grey weights partially: a uniform grey mask, normalised, is the plain loss.
    plain = train_dreambooth.masked_mse(pred, target)
    assert torch.allclose(train_dreambooth.masked_mse(pred, target, torch.full_like(mask, 0.3)), plain)
    assert torch.equal(train_dreambooth.masked_mse(pred, target, torch.zeros_like(mask)), torch.zeros(2))


def masked_run(model, config, output_dir, steps):
    """The run train_argv describes, with the data (and masks) from a data config instead of a folder."""
    return train_dreambooth.main(["--pretrained_model_name_or_path", model, "--data_backend_config", config,
                                  "--output_dir", str(output_dir), "--seed", "7", "--train_batch_size", "2",
                                  "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--lora_rank", "4"])


@pytest.mark.parametrize("family", ["flux", "if-ii"])  # packed tokens; pixel space (masks at full size)
def test_white_masks_train_exactly_like_no_masks(tiny_model, subject_dir, tmp_path, family):
    """FLUX: the loss is taken on unpacked latents, so a latent-grid mask weights it unchanged."""
    os.makedirs(tmp_path / "white")
    for name in os.listdir(subject_dir):
        Image.new("L", Image.open(os.path.join(subject_dir, name)).size, 255).save(tmp_path / "white" / name)
    model = tiny_model(family)
    plain = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "plain"))
    config = masked_data_config(tmp_path, subject_dir, tmp_path / "white", resolution=resolution_for(model))
    masked = masked_run(model, config, tmp_path / "masked", steps=4)
    a = adapters.trainable_parameters(plain["unet"])
    b = adapters.trainable_parameters(masked["unet"])
    assert a and a.keys() == b.keys()  # there are trained weights to compare, the same ones
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("family", ["sd1", "sd3"])
def test_masks_change_what_is_learned(tiny_model, subject_dir, tmp_path, family):
    """Half-black masks: training takes a different path than without masks (the masks are really used)."""
    os.makedirs(tmp_path / "half")
    for name in os.listdir(subject_dir):
        width, height = Image.open(os.path.join(subject_dir, name)).size
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).rectangle((0, 0, width // 2, height), fill=255)
        mask.save(tmp_path / "half" / name)
    model = tiny_model(family)
    plain = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "plain", "--max_train_steps", "2"))
    config = masked_data_config(tmp_path, subject_dir, tmp_path / "half", resolution=64)
    masked = masked_run(model, config, tmp_path / "masked", steps=2)
    a = adapters.trainable_parameters(plain["unet"])
    b = adapters.trainable_parameters(masked["unet"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-5
