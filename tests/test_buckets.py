"""Aspect buckets, resize/crop plans and the batch sampler, on hand-built datasets: no files, no models."""

import itertools
import math
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from common import data, images
from train_dreambooth import BatchSampler


def dataset(resolution=512, resolution_type="pixel_area", **kwargs):
    return data.Dataset(id=kwargs.pop("id", "ds"), resolution=resolution, resolution_type=resolution_type, **kwargs)


def random_sizes(count, seed=0, max_aspect=3.0):
    rng = random.Random(seed)
    sizes = []
    while len(sizes) < count:
        width, height = rng.randint(64, 5000), rng.randint(64, 5000)
        if max(width / height, height / width) <= max_aspect:
            sizes.append((width, height))
    return sizes


ALL_KINDS = [("pixel", 512), ("pixel", 700), ("area", 1.0), ("area", 0.25), ("pixel_area", 1024), ("pixel_area", 512)]


# ---------------------------------------------------------------------------------------------------------------------
# size_measure and bucket_for


def test_size_measure_uses_the_unit_of_the_resolution_type():
    assert images.size_measure(1200, 800, "pixel") == 800
    assert images.size_measure(1200, 800, "area") == pytest.approx(0.96)
    assert images.size_measure(1200, 800, "pixel_area") == pytest.approx(math.sqrt(960_000))


@pytest.mark.parametrize("crop, crop_aspect", [(False, "square"), (True, "square"), (True, "preserve")])
@pytest.mark.parametrize("kind, resolution", ALL_KINDS)
def test_every_bucket_side_is_a_multiple_of_64(kind, resolution, crop, crop_aspect):
    ds = dataset(resolution, kind, crop=crop, crop_aspect=crop_aspect)
    for width, height in random_sizes(300, seed=ALL_KINDS.index((kind, resolution)), max_aspect=8):
        bucket_w, bucket_h = images.bucket_for(width, height, ds)
        assert bucket_w % 64 == 0 and bucket_h % 64 == 0 and bucket_w >= 64 and bucket_h >= 64, (width, height)


@pytest.mark.parametrize("resolution, expected_edge", [(512, 512), (1024, 1024), (500, 512), (700, 704), (1000, 1024)])
def test_pixel_bucket_shorter_edge_is_the_rounded_resolution(resolution, expected_edge):
    ds = dataset(resolution, "pixel")
    for width, height in random_sizes(300, seed=resolution):
        bucket = images.bucket_for(width, height, ds)
        assert min(bucket) == expected_edge, (width, height, bucket)
        # The longer side follows the aspect, within the rounding to 64.
        scale = expected_edge / min(width, height)
        assert abs(max(bucket) - max(width, height) * scale) <= 32 + 32 * max(width, height) / min(width, height)


@pytest.mark.parametrize("megapixels", [0.5, 1.0, 2.0])
def test_area_bucket_has_about_the_requested_megapixels(megapixels):
    ds = dataset(megapixels, "area")
    for width, height in random_sizes(300, seed=int(megapixels * 10)):
        bucket_w, bucket_h = images.bucket_for(width, height, ds)
        assert abs(bucket_w * bucket_h / (megapixels * 1e6) - 1) < 0.15, (width, height, bucket_w, bucket_h)


def test_pixel_area_1024_means_1_048576_megapixels():
    ds = dataset(1024, "pixel_area")
    for width, height in random_sizes(300, seed=5):
        bucket_w, bucket_h = images.bucket_for(width, height, ds)
        assert abs(bucket_w * bucket_h / 1_048_576 - 1) < 0.15, (width, height, bucket_w, bucket_h)
    assert images.bucket_for(3000, 3000, ds) == (1024, 1024)
    # The same area as 'area' 1.048576 gives the same buckets.
    same = dataset(1.048576, "area")
    assert all(images.bucket_for(w, h, ds) == images.bucket_for(w, h, same) for w, h in random_sizes(100, seed=6))


def test_pixel_area_512_keeps_a_landscape_aspect_for_a_3_2_image():
    bucket_w, bucket_h = images.bucket_for(1536, 1024, dataset(512, "pixel_area"))
    assert bucket_w > bucket_h
    assert abs(bucket_w / bucket_h - 1.5) < 0.15
    assert abs(bucket_w * bucket_h / 512 ** 2 - 1) < 0.15


@pytest.mark.parametrize("kind, resolution, side", [("pixel", 512, 512), ("area", 1.0, 1024),
                                                    ("pixel_area", 1024, 1024), ("pixel_area", 768, 768)])
def test_square_crop_aspect_gives_a_square_bucket(kind, resolution, side):
    ds = dataset(resolution, kind, crop=True, crop_aspect="square")
    for width, height in [(3000, 1000), (1000, 3000), (1500, 1500), (640, 480)]:
        assert images.bucket_for(width, height, ds) == (side, side)


@pytest.mark.parametrize("kind, resolution", ALL_KINDS)
def test_preserve_crop_aspect_keeps_the_image_aspect(kind, resolution):
    ds = dataset(resolution, kind, crop=True, crop_aspect="preserve")
    for width, height in random_sizes(200, seed=11):
        bucket_w, bucket_h = images.bucket_for(width, height, ds)
        assert (bucket_w >= bucket_h) == (width >= height) or abs(width / height - 1) < 0.15
        # Each side is off by at most 32 px from the exact aspect-kept size.
        assert abs(math.log((bucket_w / bucket_h) / (width / height))) < math.log((min(bucket_w, bucket_h) + 32)
                                                                                  / (min(bucket_w, bucket_h) - 32))
        assert images.bucket_for(width, height, ds) == images.bucket_for(width, height, dataset(resolution, kind))


@pytest.mark.parametrize("kind, resolution", ALL_KINDS)
def test_portrait_and_landscape_images_land_in_swapped_buckets(kind, resolution):
    ds = dataset(resolution, kind)
    for width, height in [(1200, 800), (3000, 1000), (1024, 768)]:
        landscape = images.bucket_for(width, height, ds)
        portrait = images.bucket_for(height, width, ds)
        assert landscape != portrait
        assert portrait == landscape[::-1]
        assert landscape[0] > landscape[1]


# ---------------------------------------------------------------------------------------------------------------------
# plan_transform


@pytest.mark.parametrize("style", ["center", "corner", "random"])
@pytest.mark.parametrize("crop_aspect", ["square", "preserve"])
@pytest.mark.parametrize("kind, resolution", ALL_KINDS)
def test_crop_box_lies_inside_the_resized_image_and_has_the_target_size(kind, resolution, crop_aspect, style):
    ds = dataset(resolution, kind, crop=True, crop_aspect=crop_aspect, crop_style=style)
    for i, (width, height) in enumerate(random_sizes(100, seed=3)):
        t = images.plan_transform(width, height, ds, seed=1, key=f"img{i}")
        left, top, right, bottom = t["crop_box"]
        resized_w, resized_h = t["resized_size"]
        assert 0 <= left and 0 <= top and right <= resized_w and bottom <= resized_h
        assert [right - left, bottom - top] == t["target_size"] == list(images.bucket_for(width, height, ds))
        assert t["original_size"] == [width, height] == t["downsampled_size"]
        # The resize keeps the aspect (to a pixel) and covers the bucket.
        assert resized_w >= t["target_size"][0] and resized_h >= t["target_size"][1]
        assert abs(resized_w / resized_h - width / height) <= 1.0 / min(resized_w, resized_h) * (1 + width / height)


def test_center_crop_is_centred():
    ds = dataset(512, "pixel", crop=True, crop_aspect="square", crop_style="center")
    t = images.plan_transform(2048, 1024, ds, seed=0, key="k")
    assert t["resized_size"] == [1024, 512] and t["target_size"] == [512, 512]
    assert t["crop_box"] == [256, 0, 768, 512]
    t = images.plan_transform(1000, 3000, ds, seed=0, key="k")
    assert t["resized_size"] == [512, 1536] and t["crop_box"] == [0, 512, 512, 1024]


def test_centre_spelling_is_accepted_as_center(tmp_path):
    (tmp_path / "img").mkdir()
    [ds] = [data.validate_dataset({"id": "a", "instance_data_dir": str(tmp_path / "img"), "instance_prompt": "x",
                                   "crop": True, "crop_style": "centre"}, 0, "data.json")]
    assert ds.crop_style == "center"


def test_corner_crop_starts_at_the_top_left():
    ds = dataset(512, "pixel", crop=True, crop_aspect="square", crop_style="corner")
    assert images.plan_transform(2048, 1024, ds, seed=0, key="k")["crop_box"] == [0, 0, 512, 512]
    assert images.plan_transform(1024, 2048, ds, seed=0, key="k")["crop_box"] == [0, 0, 512, 512]


def test_random_crop_is_a_function_of_seed_and_key():
    ds = dataset(512, "pixel", crop=True, crop_aspect="square", crop_style="random")
    boxes = {(seed, key): images.plan_transform(4096, 1024, ds, seed=seed, key=key)["crop_box"]
             for seed in (0, 1, 2) for key in (f"ds/img{i}.png" for i in range(8))}
    # Same (seed, key): same box.
    assert all(images.plan_transform(4096, 1024, ds, seed=s, key=k)["crop_box"] == box for (s, k), box in boxes.items())
    # Different keys under one seed, and one key under different seeds, give different boxes.
    assert len({box[0] for (s, _), box in boxes.items() if s == 0}) > 1
    assert any(boxes[(0, k)] != boxes[(1, k)] for k in (f"ds/img{i}.png" for i in range(8)))
    # Every box is a valid 512x512 crop of the 2048x512 resized image.
    assert all(0 <= box[0] <= 2048 - 512 and box[1] == 0 and box[2] - box[0] == 512 for box in boxes.values())


@pytest.mark.parametrize("kind, resolution", ALL_KINDS)
def test_without_crop_the_rounding_trim_is_centred(kind, resolution):
    for crop_style in ("corner", "random"):  # the style only applies when crop is on
        ds = dataset(resolution, kind, crop=False, crop_style=crop_style)
        for i, (width, height) in enumerate(random_sizes(200, seed=8)):
            t = images.plan_transform(width, height, ds, seed=3, key=f"k{i}")
            spare_w = t["resized_size"][0] - t["target_size"][0]
            spare_h = t["resized_size"][1] - t["target_size"][1]
            assert t["crop_box"][:2] == [spare_w // 2, spare_h // 2]
            assert min(spare_w, spare_h) == 0  # the resize fits one side exactly


@pytest.mark.parametrize("kind, resolution, width, height", [
    ("area", 1.0, 3816, 1439),
    ("pixel_area", 1024, 1000, 1622),
    ("pixel", 480, 2027, 2294),
])
def test_without_crop_less_than_64_px_are_trimmed(kind, resolution, width, height):
    t = images.plan_transform(width, height, dataset(resolution, kind, crop=False), seed=0, key="k")
    assert t["resized_size"][0] - t["target_size"][0] < 64
    assert t["resized_size"][1] - t["target_size"][1] < 64


@pytest.mark.parametrize("kind, maximum, target, big, small", [
    ("pixel_area", 1024, 768, (4000, 3000), (1000, 700)),
    ("pixel", 1024, 512, (3000, 2000), (1500, 1000)),
    ("area", 2.0, 1.0, (4000, 3000), (1600, 1200)),
])
def test_oversized_image_is_first_downsampled_to_about_the_target(kind, maximum, target, big, small):
    ds = dataset(512 if kind != "area" else 0.25, kind, maximum_image_size=maximum, target_downsample_size=target)
    t = images.plan_transform(*big, ds, seed=0, key="big")
    down_w, down_h = t["downsampled_size"]
    assert images.size_measure(down_w, down_h, kind) == pytest.approx(target, rel=0.01)
    assert abs(down_w / down_h - big[0] / big[1]) < 0.01
    assert t["target_size"] == list(images.bucket_for(down_w, down_h, ds))
    # Below the maximum nothing is downsampled.
    t = images.plan_transform(*small, ds, seed=0, key="small")
    assert t["downsampled_size"] == list(small)


def test_without_target_size_an_oversized_image_is_downsampled_to_the_maximum():
    ds = dataset(512, "pixel_area", maximum_image_size=1024)
    down_w, down_h = images.plan_transform(4000, 3000, ds, seed=0, key="k")["downsampled_size"]
    assert images.size_measure(down_w, down_h, "pixel_area") == pytest.approx(1024, rel=0.01)


# ---------------------------------------------------------------------------------------------------------------------
# apply_transform on real pixels


def red_blue_image(width, height):
    """Left half pure red, right half pure blue."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2, 0] = 255
    array[:, width // 2:, 2] = 255
    return Image.fromarray(array)


def channel_means(image):
    return np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)


@pytest.mark.parametrize("kind, resolution", ALL_KINDS[:1] + [("pixel", 128), ("area", 0.02), ("pixel_area", 160)])
def test_apply_transform_returns_exactly_the_bucket_size(kind, resolution):
    for crop, aspect in [(False, "square"), (True, "square"), (True, "preserve")]:
        ds = dataset(resolution, kind, crop=crop, crop_aspect=aspect, crop_style="random")
        for width, height in [(300, 170), (170, 300), (257, 257), (90, 250)]:
            t = images.plan_transform(width, height, ds, seed=4, key=f"{width}x{height}")
            out = images.apply_transform(red_blue_image(width, height), t)
            assert list(out.size) == t["target_size"] and out.mode == "RGB"


def test_corner_crop_of_a_wide_image_takes_its_left_part():
    ds = dataset(64, "pixel", crop=True, crop_aspect="square", crop_style="corner")
    t = images.plan_transform(256, 128, ds, seed=0, key="k")
    assert t["resized_size"] == [128, 64] and t["crop_box"] == [0, 0, 64, 64]
    red, green, blue = channel_means(images.apply_transform(red_blue_image(256, 128), t))
    assert red > 240 and blue < 15


def test_center_crop_of_a_wide_image_takes_its_middle():
    ds = dataset(64, "pixel", crop=True, crop_aspect="square", crop_style="center")
    t = images.plan_transform(512, 128, ds, seed=0, key="k")  # resized 256x64, crop 96..160
    assert t["crop_box"] == [96, 0, 160, 64]
    out = np.asarray(images.apply_transform(red_blue_image(512, 128), t), dtype=np.float64)
    left, right = out[:, :24].reshape(-1, 3).mean(axis=0), out[:, 40:].reshape(-1, 3).mean(axis=0)
    assert left[0] > 240 and left[2] < 15
    assert right[2] > 240 and right[0] < 15


def test_random_crop_region_matches_the_recorded_box():
    """The pixels that come out are the recorded crop box of the resized image, whichever box was drawn."""
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (128, 512, 3), dtype=np.uint8))
    ds = dataset(64, "pixel", crop=True, crop_aspect="square", crop_style="random")
    for key in ("a", "b", "c"):
        t = images.plan_transform(512, 128, ds, seed=9, key=key)
        expected = source.resize(tuple(t["resized_size"]), Image.LANCZOS).crop(tuple(t["crop_box"]))
        assert np.array_equal(np.asarray(images.apply_transform(source, t)), np.asarray(expected))


def test_apply_transform_downsamples_an_oversized_image_first():
    ds = dataset(64, "pixel", maximum_image_size=200, target_downsample_size=100, crop=True, crop_style="corner")
    t = images.plan_transform(800, 400, ds, seed=0, key="k")
    assert t["downsampled_size"] == [200, 100] and t["target_size"] == [64, 64]
    out = images.apply_transform(red_blue_image(800, 400), t)
    assert out.size == (64, 64)
    red, _, blue = channel_means(out)
    assert red > 240 and blue < 15


# ---------------------------------------------------------------------------------------------------------------------
# BatchSampler


def fake_entries(dataset_id, buckets, captions=("a photo of ohwx",)):
    """ImageEntry objects with chosen buckets: buckets is a list of ((w, h), count)."""
    entries = []
    for (width, height), count in buckets:
        for i in range(count):
            relpath = f"{width}x{height}/{i}.png"
            entries.append(data.ImageEntry(
                dataset_id=dataset_id, path=f"/data/{dataset_id}/{relpath}", relpath=relpath, captions=list(captions),
                transform={"target_size": [width, height]}, cache_path=f"/cache/{dataset_id}/{relpath}.safetensors"))
    return entries


def sampler_for(specs, batch_size, seed=0, sampling="auto"):
    """specs: list of (Dataset, entries)."""
    datasets = [d for d, _ in specs]
    plans = {d.id: entries for d, entries in specs}
    return BatchSampler(datasets, plans, batch_size, seed, sampling)


def stream(sampler, count):
    return [[(entry.dataset_id, entry.relpath, caption) for entry, caption in sampler.next()] for _ in range(count)]


def test_every_batch_comes_from_one_bucket_of_one_dataset():
    a = data.Dataset(id="a", repeats=2)
    b = data.Dataset(id="b", repeats=0, probability=3)
    sampler = sampler_for([(a, fake_entries("a", [((512, 512), 5), ((640, 448), 3), ((448, 640), 1)])),
                           (b, fake_entries("b", [((512, 512), 4), ((768, 512), 7)]))], batch_size=3, seed=1)
    seen = set()
    for _ in range(300):
        batch = sampler.next()
        assert len(batch) == 3
        assert len({entry.dataset_id for entry, _ in batch}) == 1
        assert len({entry.bucket for entry, _ in batch}) == 1
        seen.add((batch[0][0].dataset_id, batch[0][0].bucket))
    assert len(seen) == 5  # every bucket of every dataset was served


@pytest.mark.parametrize("repeats", [0, 1, 3])
def test_one_epoch_shows_each_image_repeats_plus_one_times(repeats):
    ds = data.Dataset(id="a", repeats=repeats)
    entries = fake_entries("a", [((512, 512), 4), ((640, 448), 6), ((448, 640), 2)])
    sampler = sampler_for([(ds, entries)], batch_size=2, seed=5)
    per_epoch = sampler.batches_per_epoch()
    assert per_epoch == (4 + 6 + 2) * (repeats + 1) // 2
    counts = Counter(entry.path for _ in range(per_epoch) for entry, _ in sampler.next())
    assert sampler.epochs["a"] == 1
    assert counts == {entry.path: repeats + 1 for entry in entries}
    # The next batch starts the second epoch, which again shows each image repeats + 1 times.
    counts = Counter(entry.path for _ in range(per_epoch) for entry, _ in sampler.next())
    assert sampler.epochs["a"] == 2 and counts == {entry.path: repeats + 1 for entry in entries}


def test_short_last_batch_is_filled_from_its_bucket_not_dropped():
    ds = data.Dataset(id="a", repeats=0)
    entries = fake_entries("a", [((512, 512), 5), ((640, 448), 1)])
    sampler = sampler_for([(ds, entries)], batch_size=4, seed=2)
    per_epoch = sampler.batches_per_epoch()
    assert per_epoch == 2 + 1
    batches = [sampler.next() for _ in range(per_epoch)]
    assert all(len(b) == 4 for b in batches)
    counts = Counter(entry.path for b in batches for entry, _ in b)
    assert all(counts[e.path] >= 1 for e in entries)  # no photo dropped
    square = [e.path for e in entries if e.bucket == (512, 512)]
    assert sum(counts[p] for p in square) == 8 and sum(counts[p] - 1 for p in square) == 3  # 3 fill slots
    lone = next(e.path for e in entries if e.bucket == (640, 448))
    assert counts[lone] == 4  # a one-image bucket: the whole batch is that image (oversubscribed)
    notes = sampler.oversubscribed()
    assert len(notes) == 1 and "640x448" in notes[0] and "'a'" in notes[0]


def dataset_frequencies(sampler, draws):
    counts = Counter(sampler.next()[0][0].dataset_id for _ in range(draws))
    return {name: count / draws for name, count in counts.items()}


MIX = [  # (id, images, repeats, probability)
    ("subject", 4, 3, 1.0),   # auto weight 1 * 4 * 4 = 16
    ("reg", 12, 0, 1.0),      # 12
    ("style", 2, 1, 3.0),     # 3 * 2 * 2 = 12
]


def mixed_sampler(sampling, seed=0):
    specs = [(data.Dataset(id=name, repeats=repeats, probability=probability),
              fake_entries(name, [((512, 512), images)])) for name, images, repeats, probability in MIX]
    return sampler_for(specs, batch_size=1, seed=seed, sampling=sampling)


def test_auto_sampling_draws_datasets_by_probability_times_images_times_repeats():
    weights = {name: probability * images * (repeats + 1) for name, images, repeats, probability in MIX}
    total = sum(weights.values())
    freq = dataset_frequencies(mixed_sampler("auto"), 5000)
    for name, weight in weights.items():
        assert freq[name] == pytest.approx(weight / total, abs=0.03), (name, freq)


def test_uniform_sampling_draws_datasets_by_probability_alone():
    total = sum(probability for *_, probability in MIX)
    freq = dataset_frequencies(mixed_sampler("uniform"), 5000)
    for name, _, _, probability in MIX:
        assert freq[name] == pytest.approx(probability / total, abs=0.03), (name, freq)


def test_datasets_that_do_not_train_are_never_drawn():
    train = data.Dataset(id="train")
    held_out = data.Dataset(id="held", dataset_type="eval")
    masks = data.Dataset(id="masks", dataset_type="conditioning")
    sampler = sampler_for([(train, fake_entries("train", [((512, 512), 2)])),
                           (held_out, fake_entries("held", [((512, 512), 50)])),
                           (masks, fake_entries("masks", [((512, 512), 50)]))], batch_size=1)
    assert {sampler.next()[0][0].dataset_id for _ in range(100)} == {"train"}
    assert sampler.batches_per_epoch() == 2


def test_batch_stream_is_a_function_of_the_seed():
    first, second, other = mixed_sampler("auto", seed=42), mixed_sampler("auto", seed=42), mixed_sampler("auto", seed=43)
    a, b, c = stream(first, 200), stream(second, 200), stream(other, 200)
    assert a == b
    assert a != c
    assert first.drawn == 200


def test_batches_per_epoch_matches_what_one_epoch_yields():
    specs = [(data.Dataset(id="a", repeats=2), fake_entries("a", [((512, 512), 5), ((640, 448), 3)])),
             (data.Dataset(id="b", repeats=0), fake_entries("b", [((512, 512), 7), ((448, 640), 1)]))]
    for batch_size in (1, 2, 3, 4):
        sampler = sampler_for(specs, batch_size=batch_size, seed=batch_size)
        yielded = sum(len(sampler.epoch_batches(d)) for d in sampler.datasets)
        expected = sum(math.ceil(n * (r + 1) / batch_size) for n, r in [(5, 2), (3, 2), (7, 0), (1, 0)])
        assert sampler.batches_per_epoch() == yielded == expected
    # Driven through next(): a single dataset's epoch counter turns over after exactly batches_per_epoch draws.
    sampler = sampler_for(specs[:1], batch_size=3, seed=0)
    for _ in range(sampler.batches_per_epoch()):
        sampler.next()
    assert sampler.epochs["a"] == 1 and not sampler.queues["a"]
    sampler.next()
    assert sampler.epochs["a"] == 2


def test_list_instance_prompt_picks_among_its_captions():
    captions = ("a photo of ohwx dog", "ohwx dog on the beach", "a picture of ohwx")
    ds = data.Dataset(id="a", instance_prompt=list(captions))
    sampler = sampler_for([(ds, fake_entries("a", [((512, 512), 3)], captions=captions))], batch_size=1, seed=7)
    picked = Counter(caption for _ in range(600) for _, caption in sampler.next())
    assert set(picked) == set(captions)
    assert all(count > 120 for count in picked.values())  # about a third each


def test_captions_for_a_list_prompt_returns_every_choice(tmp_path):
    ds = data.Dataset(id="a", caption_strategy="instanceprompt", instance_prompt=["one", "two"])
    assert data.captions_for(str(tmp_path / "x.png"), ds) == ["one", "two"]
    ds = data.Dataset(id="a", caption_strategy="instanceprompt", instance_prompt="solo")
    assert data.captions_for(str(tmp_path / "x.png"), ds) == ["solo"]


def test_plan_transform_ignores_call_order_and_the_global_rng():
    """plan_transform is pure: calling it in any order gives the same plans (no hidden global RNG)."""
    ds = dataset(512, "pixel", crop=True, crop_style="random")
    keys = [f"k{i}" for i in range(5)]
    forward = [images.plan_transform(w, h, ds, 1, k) for (w, h), k in itertools.product([(2000, 900), (900, 2000)], keys)]
    random.seed(123)  # the global RNG must not matter
    backward = [images.plan_transform(w, h, ds, 1, k)
                for (w, h), k in reversed(list(itertools.product([(2000, 900), (900, 2000)], keys)))]
    assert forward == backward[::-1]
