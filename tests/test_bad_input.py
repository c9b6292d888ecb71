"""Bad input: every broken file or config gets a clear message naming the file and the fix, the good files are still
processed, and nothing partial is left behind.

Every broken file is built here, inside tmp_path, from PIL / numpy / raw bytes; nothing binary is committed."""

import argparse
import importlib
import io
import json
import os
import struct
import time
import zlib

import numpy as np
import pytest
from conftest import train_argv, write_json
from PIL import Image, ImageFile

from common import adapters, caches, data, images, models
import make_demo
import train_dreambooth

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: build good and broken files


def save(image, path, fmt=None, **params):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    image.save(str(path), fmt, **params)
    return str(path)


def noise_image(width=64, height=64, seed=0):
    """Random pixels: they compress badly, so cutting a file in half really cuts pixel data."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image, fmt, **params):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def write_bytes(path, data):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(str(path), "wb") as handle:
        handle.write(data)
    return str(path)


def truncated(path, fmt, size=(64, 64)):
    """A file whose header is intact and whose pixel data stops half way."""
    data = encoded(noise_image(*size), fmt)
    return write_bytes(path, data[:len(data) // 2])


def png_claiming_size(path, width, height):
    """A real 1x1 PNG whose IHDR is patched (CRC recomputed) to claim width x height: a decompression bomb header
    that costs a few bytes to make."""
    data = bytearray(encoded(Image.new("L", (1, 1), 0), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return write_bytes(path, bytes(data))


def jpeg_claiming_size(path, width, height):
    """A real 8x8 JPEG whose frame header (SOF0: marker, length, precision, height, width) is patched to claim
    width x height."""
    data = bytearray(encoded(Image.new("L", (8, 8), 0), "JPEG"))
    start = data.index(b"\xff\xc0")
    data[start + 5:start + 9] = struct.pack(">HH", height, width)
    return write_bytes(path, bytes(data))


BOMBS = {"png": png_claiming_size, "jpg": jpeg_claiming_size}


def dataset(folder, tmp_path, **overrides):
    values = dict(id="subject", instance_data_dir=str(folder), caption_strategy="instanceprompt",
                  instance_prompt="a photo of ohwx toy", resolution=64, resolution_type="pixel_area",
                  cache_dir_vae=str(tmp_path / "vae"))
    values.update(overrides)
    return data.Dataset(**values)


def skip_reasons(skipped):
    return {os.path.basename(path): reason for path, reason in skipped}


def data_args(tmp_path, config):
    return argparse.Namespace(data_backend_config=str(config), instance_data_dir=None, instance_prompt=None,
                              resolution=64.0, resolution_type="pixel_area", output_dir=str(tmp_path / "out"),
                              cache_dir=None)


def model_args(ref, tmp_path):
    return argparse.Namespace(pretrained_model_name_or_path=str(ref), output_dir=str(tmp_path / "out"), cache_dir=None,
                              variant=None, revision=None, local_files_only=True, single_file_config=None)


def exit_text(excinfo):
    return str(excinfo.value.code)


def all_files(folder):
    return sorted(os.path.join(root, name) for root, _, names in os.walk(str(folder)) for name in names)


@pytest.fixture
def forbid_decoding(monkeypatch):
    """Any attempt to decode pixel data fails the test: header checks must never get that far."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"pixel data of a {self.size[0]}x{self.size[1]} image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.fixture
def forbid_model_loading(monkeypatch):
    """Loading any model weights fails the test: input errors must stop a script before that."""

    def refuse(info, subfolder, *args, **kwargs):
        raise AssertionError(f"{subfolder} of {info.ref} was loaded")

    monkeypatch.setattr(models, "load_component", refuse)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Per-file image problems


def test_truncated_jpeg_passes_the_header_plan_but_fails_to_decode_clearly(tmp_path):
    save(noise_image(), tmp_path / "data" / "good.png")
    broken = truncated(tmp_path / "data" / "cut.jpg", "JPEG")
    entries, skipped = data.plan_dataset(dataset(tmp_path / "data", tmp_path), seed=0)
    assert sorted(os.path.basename(e.path) for e in entries) == ["cut.jpg", "good.png"] and skipped == []
    with pytest.raises(ValueError) as excinfo:
        images.load_image(broken)
    assert "truncated" in str(excinfo.value) and "re-export or remove it" in str(excinfo.value)


def test_truncated_png_passes_the_header_only_plan(tmp_path):
    save(noise_image(), tmp_path / "data" / "good.png")
    truncated(tmp_path / "data" / "cut.png", "PNG")
    entries, skipped = data.plan_dataset(dataset(tmp_path / "data", tmp_path), seed=0)
    assert skipped == []
    assert sorted(os.path.basename(e.path) for e in entries) == ["cut.png", "good.png"]


def test_truncated_png_fails_to_decode_with_a_message_saying_truncated(tmp_path):
    broken = truncated(tmp_path / "cut.png", "PNG")
    with pytest.raises(ValueError, match="truncated"):
        images.load_image(broken)


def test_build_vae_cache_skips_truncated_images_and_caches_the_rest(tiny_model, tmp_path):
    data_dir = tmp_path / "data"
    good = [save(noise_image(seed=i), data_dir / f"good_{i}.png") for i in range(2)]
    cut_jpeg = truncated(data_dir / "cut.jpg", "JPEG")  # the header plan keeps it
    cut_png = save(noise_image(seed=9), data_dir / "cut.png")  # cut after planning: header and data were fine then
    entries, skipped = data.plan_dataset(dataset(data_dir, tmp_path), seed=0)
    assert len(entries) == 4 and skipped == []
    with open(cut_png, "rb") as handle:
        whole = handle.read()
    write_bytes(cut_png, whole[:len(whole) // 2])

    info = models.resolve_model(model_args(tiny_model("sd1"), tmp_path))
    printed = []
    kept, written = caches.build_vae_cache(entries, info, batch_size=4, print_fn=printed.append)

    assert sorted(e.path for e in kept) == sorted(good) and written == 2
    for path in (cut_jpeg, cut_png):
        line = next(line for line in printed if line.startswith(f"skipped {path}: "))
        assert "truncated" in line
    # Exactly the good latents on disk: nothing for the broken images, no temporary files.
    assert all_files(tmp_path / "vae") == sorted(e.cache_path for e in kept)
    assert not any(".tmp" in name for name in all_files(tmp_path / "vae"))


def test_zero_byte_file_is_reported_as_an_empty_file(tmp_path):
    save(noise_image(), tmp_path / "data" / "good.png")
    empty = write_bytes(tmp_path / "data" / "empty.png", b"")
    entries, skipped = data.plan_dataset(dataset(tmp_path / "data", tmp_path), seed=0)
    assert [os.path.basename(e.path) for e in entries] == ["good.png"]
    assert skipped == [(empty, "empty file (0 bytes)")]
    with pytest.raises(ValueError, match=r"empty file \(0 bytes\)"):
        images.load_image(empty)


def test_text_file_named_png_is_reported_as_not_an_image(tmp_path):
    save(noise_image(), tmp_path / "data" / "good.png")
    fake = write_bytes(tmp_path / "data" / "notes.png", b"this is a shopping list, not a picture\n")
    entries, skipped = data.plan_dataset(dataset(tmp_path / "data", tmp_path), seed=0)
    assert [os.path.basename(e.path) for e in entries] == ["good.png"]
    assert [path for path, _ in skipped] == [fake] and "not an image" in skipped[0][1]
    with pytest.raises(ValueError, match="not an image"):
        images.load_image(fake)


@pytest.mark.parametrize("ext", BOMBS)
def test_decompression_bomb_is_refused_by_its_header_size_before_decoding(tmp_path, forbid_decoding, ext):
    bomb = BOMBS[ext](tmp_path / f"bomb.{ext}", 20000, 20000)
    assert os.path.getsize(bomb) < 1000  # 400 MP promised by a file of a few hundred bytes
    started = time.perf_counter()
    with pytest.raises(ValueError) as excinfo:
        images.image_size(bomb)
    with pytest.raises(ValueError):
        images.load_image(bomb)
    assert time.perf_counter() - started < 1.0
    assert "limit" in str(excinfo.value) and "refused before decoding" in str(excinfo.value)


@pytest.mark.parametrize("ext", BOMBS)
def test_decompression_bomb_is_skipped_by_the_plan_and_the_good_image_kept(tmp_path, ext):
    save(noise_image(), tmp_path / "data" / "good.png")
    BOMBS[ext](tmp_path / "data" / f"bomb.{ext}", 20000, 20000)
    started = time.perf_counter()
    entries, skipped = data.plan_dataset(dataset(tmp_path / "data", tmp_path), seed=0)
    assert time.perf_counter() - started < 1.0
    assert [os.path.basename(e.path) for e in entries] == ["good.png"]
    reason = skip_reasons(skipped)[f"bomb.{ext}"]
    assert "limit" in reason and "400000000" in reason


@pytest.mark.parametrize("ext", BOMBS)
def test_decompression_bomb_is_refused_by_our_own_check_when_pils_guard_is_off(tmp_path, monkeypatch,
                                                                               forbid_decoding, ext):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    bomb = BOMBS[ext](tmp_path / f"bomb.{ext}", 20000, 20000)
    with pytest.raises(ValueError) as excinfo:
        images.image_size(bomb)
    message = str(excinfo.value)
    assert "20000x20000" in message and "400 MP" in message and "limit" in message and "downscale" in message


def test_one_pixel_image_is_too_small(tmp_path):
    save(noise_image(), tmp_path / "data" / "good.png")
    save(Image.new("RGB", (1, 1), RED), tmp_path / "data" / "dot.png")
    entries, skipped = data.plan_dataset(dataset(tmp_path / "data", tmp_path), seed=0)
    assert [os.path.basename(e.path) for e in entries] == ["good.png"]
    assert skip_reasons(skipped) == {"dot.png": f"1x1 is too small to train on (under {images.MIN_IMAGE_EDGE} px)"}


def test_image_below_minimum_image_size_names_its_size_and_the_limit(tmp_path):
    save(noise_image(128, 128), tmp_path / "data" / "big.png")
    save(noise_image(48, 40), tmp_path / "data" / "small.png")
    entries, skipped = data.plan_dataset(dataset(tmp_path / "data", tmp_path, minimum_image_size=100), seed=0)
    assert [os.path.basename(e.path) for e in entries] == ["big.png"]
    reason = skip_reasons(skipped)["small.png"]
    assert "48x40" in reason and "minimum_image_size 100" in reason


# ---------------------------------------------------------------------------------------------------------------------
# 2. Conversions by load_image


def pixel(image, x, y):
    return np.asarray(image, dtype=int)[y, x]


def test_cmyk_jpeg_becomes_rgb_with_the_right_colours(tmp_path):
    path = save(Image.new("CMYK", (32, 32), (255, 0, 0, 0)), tmp_path / "cyan.jpg", "JPEG", quality=100)
    assert Image.open(path).mode == "CMYK"
    image = images.load_image(path)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert np.abs(pixel(image, 16, 16) - (0, 255, 255)).max() <= 3


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = np.full((32, 32), 65535, dtype=np.uint16)
    values[16:] = 32768
    path = save(Image.fromarray(values), tmp_path / "gray16.png")
    assert Image.open(path).mode == "I;16"
    image = images.load_image(path)
    assert image.mode == "RGB"
    assert tuple(pixel(image, 0, 0)) == (255, 255, 255)
    assert all(abs(v - 128) <= 1 for v in pixel(image, 0, 31))  # 32768 / 65535 of full scale, not clipped to 255


def test_dark_16_bit_png_stays_dark(tmp_path):
    values = np.full((32, 32), 255, dtype=np.uint16)
    values[16:] = 0
    path = save(Image.fromarray(values), tmp_path / "dark16.png")
    assert Image.open(path).mode == "I;16"
    image = images.load_image(path)
    assert tuple(pixel(image, 0, 0)) == (1, 1, 1) and tuple(pixel(image, 0, 31)) == (0, 0, 0)


def test_palette_png_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (32, 16), 0)
    image.putpalette(list(RED) + list(BLUE) + [0] * (256 * 3 - 6))
    image.paste(1, (16, 0, 32, 16))  # right half: index 1, the transparent one
    path = save(image, tmp_path / "palette.png", transparency=1)
    assert Image.open(path).mode == "P"
    loaded = images.load_image(path)
    assert loaded.mode == "RGB"
    assert tuple(pixel(loaded, 4, 8)) == RED and tuple(pixel(loaded, 28, 8)) == WHITE


def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    gradient = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (16, 1))
    path = save(Image.fromarray(gradient, mode="L"), tmp_path / "gray.png")
    loaded = np.asarray(images.load_image(path))
    assert loaded.shape == (16, 32, 3)
    assert all((loaded[..., channel] == gradient).all() for channel in range(3))


@pytest.mark.parametrize("mode,colour", [("RGBA", (10, 200, 30, 0)), ("LA", (10, 0))])
def test_fully_transparent_pixels_become_white(tmp_path, mode, colour):
    image = Image.new(mode, (16, 16), colour)
    half = (0, 0, 0, 128) if mode == "RGBA" else (0, 128)
    image.paste(half, (0, 8, 16, 16))  # bottom half: half-transparent black
    loaded = images.load_image(save(image, tmp_path / "alpha.png"))
    assert loaded.mode == "RGB"
    assert tuple(pixel(loaded, 8, 2)) == WHITE
    assert all(abs(v - 127) <= 1 for v in pixel(loaded, 8, 12))  # composited, not just alpha dropped


def test_rgb_png_with_a_transparent_colour_key_is_composited_on_white(tmp_path):
    image = Image.new("RGB", (16, 16), (10, 20, 30))
    image.paste(RED, (0, 8, 16, 16))
    path = save(image, tmp_path / "keyed.png", transparency=(10, 20, 30))
    loaded = images.load_image(path)
    assert tuple(pixel(loaded, 8, 2)) == WHITE and tuple(pixel(loaded, 8, 12)) == RED


# How a camera stores an upright picture under each EXIF orientation, written from the tag's definition (where the
# stored first row and first column belong when shown): 2 mirrored left-right, 3 turned 180 degrees, 4 mirrored
# top-bottom, 5 mirrored across the main diagonal, 6 turned 90 degrees counter-clockwise (a viewer turns it back
# clockwise), 7 mirrored across the other diagonal, 8 turned 90 degrees clockwise.
STORED_UNDER_ORIENTATION = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, 1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),
}


def six_colour_grid():
    """48x32 pixels, six 16 px blocks of different colours: every mirror and turn of it looks different."""
    colours = [[RED, (0, 255, 0), BLUE], [WHITE, (0, 0, 0), (255, 255, 0)]]
    return np.array(colours, dtype=np.uint8).repeat(16, axis=0).repeat(16, axis=1)


# PNG keeps the pixels exactly; JPEG (4:4:4, blocks aligned to its 8 px grid) within a few levels.
@pytest.mark.parametrize("fmt,tolerance", [("PNG", 0), ("JPEG", 4)])
@pytest.mark.parametrize("orientation", sorted(STORED_UNDER_ORIENTATION))
def test_every_exif_orientation_comes_out_upright_pixel_for_pixel(tmp_path, orientation, fmt, tolerance):
    upright = six_colour_grid()
    stored = np.ascontiguousarray(STORED_UNDER_ORIENTATION[orientation](upright))
    assert stored.shape != upright.shape or (stored != upright).any()
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = orientation
    params = dict(quality=95, subsampling=0) if fmt == "JPEG" else {}
    path = save(Image.fromarray(stored), tmp_path / f"turned.{fmt.lower()}", fmt, exif=exif, **params)
    assert Image.open(path).size == (stored.shape[1], stored.shape[0])
    assert images.image_size(path) == (48, 32)  # from the header, upright
    loaded = np.asarray(images.load_image(path), dtype=int)
    assert loaded.shape == upright.shape
    assert np.abs(loaded - upright).max() <= tolerance


def test_exif_rotated_portrait_lands_in_a_portrait_bucket(tmp_path):
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6
    save(noise_image(128, 64), tmp_path / "data" / "phone.jpg", "JPEG", exif=exif)
    [entry], _ = data.plan_dataset(dataset(tmp_path / "data", tmp_path), seed=0)
    assert entry.transform["original_size"] == [64, 128]
    width, height = entry.bucket
    assert height > width


# ---------------------------------------------------------------------------------------------------------------------
# 3. Discovery


def test_symlink_loop_is_reported_and_the_good_images_are_still_found(tmp_path):
    data_dir = tmp_path / "data"
    good = [save(noise_image(), data_dir / "a.png"), save(noise_image(), data_dir / "sub" / "b.png")]
    os.symlink(str(data_dir), str(data_dir / "sub" / "loop"))  # data_dir/sub/loop -> data_dir: an endless tree if followed
    started = time.perf_counter()
    found, problems = data.find_images(str(data_dir))
    assert time.perf_counter() - started < 1.0
    assert found == good
    assert [path for path, _ in problems] == [str(data_dir / "sub" / "loop")]
    assert "symlink loop" in problems[0][1] and "not followed" in problems[0][1]
    # The plan reports the loop among its skipped items and keeps both images.
    entries, skipped = data.plan_dataset(dataset(data_dir, tmp_path), seed=0)
    assert [e.path for e in entries] == good and skipped == problems


def test_dangling_symlink_named_like_an_image_is_skipped_not_a_crash(tmp_path):
    data_dir = tmp_path / "data"
    save(noise_image(), data_dir / "good.png")
    os.symlink(str(tmp_path / "deleted.png"), str(data_dir / "gone.png"))
    entries, skipped = data.plan_dataset(dataset(data_dir, tmp_path), seed=0)
    assert [os.path.basename(e.path) for e in entries] == ["good.png"]
    assert list(skip_reasons(skipped)) == ["gone.png"]


def test_unicode_and_space_file_names_are_found_planned_and_decoded(tmp_path):
    data_dir = tmp_path / "data"
    names = ["café ü 写真.png", "my dog photo 01.jpg", "ohwx (2).webp"]
    for name in names:
        save(noise_image(), data_dir / name)
    found, problems = data.find_images(str(data_dir))
    assert sorted(os.path.basename(p) for p in found) == sorted(names) and problems == []
    entries, skipped = data.plan_dataset(dataset(data_dir, tmp_path, caption_strategy="filename"), seed=0)
    assert skipped == []
    assert {e.relpath: e.captions for e in entries} == {
        "café ü 写真.png": ["café ü 写真"], "my dog photo 01.jpg": ["my dog photo"], "ohwx (2).webp": ["ohwx"]}
    for entry in entries:
        assert images.load_image(entry.path).size == (64, 64)
        assert entry.cache_path.startswith(str(tmp_path / "vae")) and entry.relpath in entry.cache_path


def test_uppercase_extensions_are_found(tmp_path):
    data_dir = tmp_path / "data"
    names = ["A.JPG", "B.PNG", "C.JpEg", "D.WEBP", "e.Bmp"]
    for name in names:
        save(noise_image(), data_dir / name)
    write_bytes(data_dir / "README.TXT", b"not an image")
    found, _ = data.find_images(str(data_dir))
    assert sorted(os.path.basename(p) for p in found) == sorted(names)


def test_hidden_files_and_folders_are_ignored(tmp_path):
    data_dir = tmp_path / "data"
    visible = save(noise_image(), data_dir / "visible.png")
    save(noise_image(), data_dir / ".hidden.png")
    write_bytes(data_dir / "._visible.png", b"\x00\x05\x16\x07 AppleDouble junk")
    save(noise_image(), data_dir / ".thumbnails" / "thumb.png")
    found, problems = data.find_images(str(data_dir))
    assert found == [visible] and problems == []


# ---------------------------------------------------------------------------------------------------------------------
# 4. Captions


def test_missing_caption_files_are_all_listed(tmp_path):
    data_dir = tmp_path / "data"
    for name in ("one", "two", "three"):
        save(noise_image(), data_dir / f"{name}.png")
    (data_dir / "two.txt").write_text("a photo of ohwx toy", encoding="utf-8")
    with pytest.raises(SystemExit) as excinfo:
        data.plan_dataset(dataset(data_dir, tmp_path, caption_strategy="textfile", instance_prompt=None), seed=0)
    message = exit_text(excinfo)
    assert "'subject'" in message and "2 caption file(s) are missing" in message
    assert str(data_dir / "one.txt") in message and str(data_dir / "three.txt") in message
    assert str(data_dir / "two.txt") not in message
    assert "write them or change the strategy" in message


@pytest.mark.parametrize("script", ["train_dreambooth", "cache_latents"])
def test_missing_caption_files_stop_the_scripts_before_any_model_work_leaving_nothing(tiny_model, tmp_path, script,
                                                                                      forbid_model_loading):
    data = tmp_path / "data"
    for i, name in enumerate(("one", "two", "three")):
        save(noise_image(seed=i), data / f"{name}.png")
    (data / "two.txt").write_text("a photo of ohwx toy", encoding="utf-8")
    config = write_json(tmp_path / "data.json",
                        [{"id": "subject", "instance_data_dir": str(data), "caption_strategy": "textfile"}])
    before = all_files(tmp_path)
    with pytest.raises(SystemExit) as excinfo:
        importlib.import_module(script).main([
            "--pretrained_model_name_or_path", tiny_model("sd1"), "--data_backend_config", config,
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--resolution", "64"])
    message = exit_text(excinfo)
    assert "'subject'" in message and "2 caption file(s) are missing" in message
    assert str(data / "one.txt") in message and str(data / "three.txt") in message
    assert str(data / "two.txt") not in message
    assert all_files(tmp_path) == before  # no output, no cache: nothing written anywhere


@pytest.mark.parametrize("name,caption", [("ohwx_dog_03.jpg", "ohwx dog"),
                                          ("a photo of ohwx (2).png", "a photo of ohwx"),
                                          ("ohwx_dog_03 (2).jpg", "ohwx dog")])
def test_filename_captions_drop_underscores_and_numbering(tmp_path, name, caption):
    assert data.caption_from_filename(name) == caption
    save(noise_image(), tmp_path / "data" / name)
    [entry], _ = data.plan_dataset(dataset(tmp_path / "data", tmp_path, caption_strategy="filename"), seed=0)
    assert entry.captions == [caption]


# ---------------------------------------------------------------------------------------------------------------------
# 5. The data backend config


@pytest.fixture
def images_dir(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    return str(folder)


def load_error(tmp_path, config):
    with pytest.raises(SystemExit) as excinfo:
        data.load_datasets(data_args(tmp_path, config))
    message = exit_text(excinfo)
    assert str(config) in message
    return message


def test_duplicate_dataset_ids_are_an_error_naming_the_id(tmp_path, images_dir):
    entry = {"id": "subject", "instance_data_dir": images_dir, "instance_prompt": "x"}
    config = write_json(tmp_path / "data.json", [entry, {**entry, "repeats": 2}])
    message = load_error(tmp_path, config)
    assert "'subject'" in message and "unique" in message


def test_unknown_dataset_key_suggests_the_closest(tmp_path, images_dir):
    config = write_json(tmp_path / "data.json",
                        [{"id": "subject", "instance_data_dir": images_dir, "instance_prompt": "x", "reapeats": 3}])
    message = load_error(tmp_path, config)
    assert "unknown key 'reapeats'" in message and "did you mean 'repeats'?" in message


def test_wrongly_typed_value_names_the_key_and_the_expected_type(tmp_path, images_dir):
    config = write_json(tmp_path / "data.json",
                        [{"id": "subject", "instance_data_dir": images_dir, "instance_prompt": "x", "repeats": "ten"}])
    message = load_error(tmp_path, config)
    assert "'repeats' must be a whole number" in message and '"ten"' in message and "'subject'" in message


def test_missing_instance_data_dir_is_an_error_naming_the_folder(tmp_path):
    missing = str(tmp_path / "nowhere")
    config = write_json(tmp_path / "data.json",
                        [{"id": "subject", "instance_data_dir": missing, "instance_prompt": "x"}])
    message = load_error(tmp_path, config)
    assert missing in message and "not a folder" in message and "fix the path" in message


def test_a_config_that_is_not_a_list_is_refused(tmp_path, images_dir):
    config = write_json(tmp_path / "data.json", {"id": "subject", "instance_data_dir": images_dir})
    assert "JSON list of dataset objects" in load_error(tmp_path, config)


def test_invalid_json_reports_line_and_column(tmp_path, images_dir):
    config = tmp_path / "data.json"
    config.write_text('[\n  {"id": "subject",\n   "instance_data_dir": %s,\n  }\n]\n' % json.dumps(images_dir),
                      encoding="utf-8")
    message = load_error(tmp_path, config)
    assert "not valid JSON" in message and "line 4, column 3" in message


def test_conditioning_data_pointing_at_an_unknown_id_is_refused(tmp_path, images_dir):
    config = write_json(tmp_path / "data.json", [
        {"id": "subject", "instance_data_dir": images_dir, "instance_prompt": "x", "conditioning_data": "masks"},
        {"id": "mask", "instance_data_dir": images_dir, "dataset_type": "conditioning", "conditioning_type": "mask"},
    ])
    message = load_error(tmp_path, config)
    assert "'subject'" in message and "conditioning_data 'masks'" in message and '"conditioning"' in message


# ---------------------------------------------------------------------------------------------------------------------
# 6. A dataset that filtering empties


def test_dataset_whose_images_are_all_skipped_is_an_error(tmp_path):
    data_dir = tmp_path / "data"
    for i in range(3):
        save(noise_image(8, 8, seed=i), data_dir / f"tiny_{i}.png")
    printed = []
    with pytest.raises(SystemExit) as excinfo:
        data.plan_datasets([dataset(data_dir, tmp_path)], seed=0, print_fn=printed.append)
    message = exit_text(excinfo)
    assert "'subject'" in message and str(data_dir) in message and "all 3 were skipped" in message
    assert sorted(printed) == [f"skipped {data_dir / f'tiny_{i}.png'}: 8x8 is too small to train on "
                               f"(under {images.MIN_IMAGE_EDGE} px)" for i in range(3)]


# ---------------------------------------------------------------------------------------------------------------------
# 7. Models


def test_folder_without_model_index_is_refused(tmp_path):
    folder = tmp_path / "not-a-model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(SystemExit) as excinfo:
        models.resolve_model(model_args(folder, tmp_path))
    message = exit_text(excinfo)
    assert str(folder) in message and "model_index.json" in message and "Point at the folder" in message


def test_model_path_that_does_not_exist_is_refused(tmp_path):
    missing = tmp_path / "models" / "sd15"
    with pytest.raises(SystemExit) as excinfo:
        models.resolve_model(model_args(missing, tmp_path))
    assert str(missing) in exit_text(excinfo) and "no such folder or file" in exit_text(excinfo)


# Each case: the changes to one good dataset entry (one dict per entry), whether the model folder lacks its
# model_index.json, and what the message must say besides the file's path.
CONFIG_AND_MODEL_ERRORS = {
    "duplicate id": ([{}, {"repeats": 2}], False, ["two datasets have the id 'subject'", "unique"]),
    "unknown key": ([{"reapeats": 3}], False, ["dataset 'subject'", "unknown key 'reapeats'",
                                               "did you mean 'repeats'?"]),
    "repeats ten": ([{"repeats": "ten"}], False, ["dataset 'subject'", "'repeats' must be a whole number", '"ten"']),
    "no model_index.json": ([{}], True, ["no model_index.json"]),
}


@pytest.mark.parametrize("script", ["train_dreambooth", "cache_latents"])
@pytest.mark.parametrize("case", CONFIG_AND_MODEL_ERRORS)
def test_config_and_model_errors_stop_the_scripts_naming_the_file_and_leaving_nothing(tiny_model, tmp_path, script,
                                                                                      case, forbid_model_loading):
    entries, broken_model, words = CONFIG_AND_MODEL_ERRORS[case]
    save(noise_image(), tmp_path / "data" / "good.png")
    good = {"id": "subject", "instance_data_dir": str(tmp_path / "data"), "instance_prompt": "a photo of ohwx toy"}
    config = write_json(tmp_path / "data.json", [{**good, **changes} for changes in entries])
    model = tiny_model("sd1")
    if broken_model:
        model = str(tmp_path / "not-a-model")  # a UNet config, but no model_index.json above it
        os.makedirs(os.path.join(model, "unet"))
        write_json(os.path.join(model, "unet", "config.json"), {})
    before = all_files(tmp_path)
    with pytest.raises(SystemExit) as excinfo:
        importlib.import_module(script).main([
            "--pretrained_model_name_or_path", model, "--data_backend_config", config,
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--resolution", "64"])
    message = exit_text(excinfo)
    assert (model if broken_model else config) in message
    assert all(word in message for word in words), message
    assert all_files(tmp_path) == before  # no output, no cache: nothing written anywhere


def test_class_images_from_an_sdxl_refiner_are_refused(tiny_model, tmp_path):
    import make_regularisation

    refiner = tiny_model("sdxl-refiner")
    with pytest.raises(SystemExit) as excinfo:
        make_regularisation.main(["--pretrained_model_name_or_path", refiner, "--class_prompt", "a toy",
                                  "--output_dir", str(tmp_path / "reg"), "--num_images", "1"])
    message = exit_text(excinfo)
    assert refiner in message and "refiner" in message and "SDXL base model" in message
    assert not os.path.exists(tmp_path / "reg")


# ---------------------------------------------------------------------------------------------------------------------
# 8-9. End to end


def test_training_skips_broken_files_and_still_saves_the_lora(tiny_model, tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(4):
        save(make_demo.draw_subject(64, 64, seed=i), data / f"good_{i}.png")
    bad = [truncated(data / "cut.jpg", "JPEG"), write_bytes(data / "empty.png", b""),
           write_bytes(data / "notes.png", b"remember to buy milk\n")]
    out = tmp_path / "out"
    result = train_dreambooth.main(train_argv(tiny_model("sd1"), str(data), out, "--max_train_steps", "2"))
    printed = capsys.readouterr().out
    for path in bad:
        assert f"skipped {path}: " in printed
    assert "truncated" in printed and "empty file" in printed and "not an image" in printed
    assert result["steps"] == 2
    assert os.path.getsize(out / adapters.LORA_WEIGHTS_NAME) > 0
    latents = [p for p in all_files(out / "cache" / "vae") if p.endswith(".safetensors")]
    assert sorted(os.path.basename(p).split("-")[0] for p in latents) == [f"good_{i}.png" for i in range(4)]
    assert not any(".tmp" in p for p in all_files(out))


def test_bucket_smaller_than_the_batch_is_oversubscribed_and_still_trains(tiny_model, subject_dir, tmp_path, capsys):
    out = tmp_path / "out"
    result = train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, out, "--max_train_steps", "2",
                                              "--train_batch_size", "4", resolution=192))
    notices = [line for line in capsys.readouterr().out.splitlines() if "oversubscribed" in line]
    # Two portrait (128x256) and two landscape (256x128) images against a batch of 4; the 4 squares fill theirs.
    assert len(notices) == 2
    assert any("bucket 128x256" in n and "holds 2 image(s)" in n for n in notices)
    assert any("bucket 256x128" in n and "holds 2 image(s)" in n for n in notices)
    assert result["steps"] == 2 and os.path.isfile(out / adapters.LORA_WEIGHTS_NAME)


# ---------------------------------------------------------------------------------------------------------------------
# 10. The whole corpus at once, through the scripts a person runs


def build_corpus(data, masks):
    """Every kind of awkward file in one folder, and a white mask for each (one of the wrong size).
    Returns ({name: reason a skipped file must be given}, [names that must be cached])."""
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette(list(RED) + list(BLUE) + [0] * (256 * 3 - 6))
    palette.paste(1, (32, 0, 64, 64))
    good = {
        "good.png": lambda p: save(noise_image(), p),
        "café ü 写真 01.png": lambda p: save(noise_image(seed=1), p),
        "UPPER.JPG": lambda p: save(noise_image(seed=2), p, "JPEG"),
        "cmyk.jpg": lambda p: save(Image.new("CMYK", (64, 64), (255, 0, 0, 0)), p, "JPEG"),
        "gray16.png": lambda p: save(Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)), p),
        "palette.png": lambda p: save(palette, p, transparency=1),
        "gray.png": lambda p: save(Image.new("L", (64, 64), 90), p),
        "rgba.png": lambda p: save(Image.new("RGBA", (64, 64), (10, 200, 30, 128)), p),
        "phone.jpg": lambda p: save(noise_image(128, 64, seed=3), p, "JPEG", exif=exif),  # portrait once upright
    }
    bad = {
        "cut.jpg": ("truncated", lambda p: truncated(p, "JPEG")),
        "empty.png": ("empty file", lambda p: write_bytes(p, b"")),
        "notes.png": ("not an image", lambda p: write_bytes(p, b"remember to buy milk\n")),
        "dot.png": ("too small", lambda p: save(Image.new("RGB", (1, 1)), p)),
        "bomb.png": ("refused before decoding", lambda p: png_claiming_size(p, 20000, 20000)),
        "wrong_mask.png": ("a mask must have its image's size", lambda p: save(noise_image(seed=4), p)),
    }
    for name, make in good.items():
        make(data / name)
    for name, (_, make) in bad.items():
        make(data / name)
    mask_sizes = {"phone.jpg": (64, 128), "dot.png": (1, 1), "wrong_mask.png": (32, 32)}  # the rest: 64 x 64
    for name in [*good, *bad]:
        save(Image.new("L", mask_sizes.get(name, (64, 64)), 255), masks / (os.path.splitext(name)[0] + ".png"))
    os.symlink(str(data), str(data / "loop"))  # a folder link back to the top: an endless tree if followed
    return {**{name: reason for name, (reason, _) in bad.items()}, "loop": "symlink loop"}, sorted(good)


def test_the_bad_input_corpus_is_reported_file_by_file_and_the_good_files_train(tiny_model, tmp_path, capsys):
    import cache_latents

    data, masks = tmp_path / "data", tmp_path / "masks"
    reasons, good = build_corpus(data, masks)
    config = write_json(tmp_path / "data.json", [
        {"id": "subject", "instance_data_dir": str(data), "instance_prompt": "a photo of ohwx toy",
         "resolution": 64, "conditioning_data": "subject-masks"},
        {"id": "subject-masks", "dataset_type": "conditioning", "conditioning_type": "mask",
         "instance_data_dir": str(masks)}])
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", tiny_model("sd1"), "--data_backend_config", config,
            "--output_dir", str(out), "--resolution", "64"]
    plans = cache_latents.main(argv)
    printed = capsys.readouterr().out
    for name, reason in reasons.items():  # one line per bad file, naming it, with its reason
        [line] = [line for line in printed.splitlines() if line.startswith(f"skipped {data / name}")]
        assert reason in line, line
    [line] = [line for line in printed.splitlines() if line.startswith(f"skipped {data / 'wrong_mask.png'}: ")]
    assert f"its mask {masks / 'wrong_mask.png'} is 32x32, the image 64x64" in line  # the file to remake, by path
    assert sorted(e.relpath for e in plans["subject"]) == good
    cached = [p for p in all_files(out / "cache" / "vae") if p.endswith(".safetensors")]
    assert sorted(os.path.basename(p).rsplit("-", 1)[0] for p in cached) == good  # no partial or extra entry
    assert not any(".tmp" in p for p in all_files(out))
    width, height = next(e for e in plans["subject"] if e.relpath == "phone.jpg").bucket
    assert height > width  # EXIF-rotated: upright, in a portrait bucket

    result = train_dreambooth.main(argv + ["--max_train_steps", "2", "--train_batch_size", "1", "--seed", "0"])
    assert result["steps"] == 2 and os.path.isfile(out / adapters.LORA_WEIGHTS_NAME)
    assert "nothing to encode" in capsys.readouterr().out  # training reused the cache the script built
