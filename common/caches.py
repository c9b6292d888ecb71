"""Caches: VAE latents and text embeddings on disk, so training runs neither the VAE nor the text encoders.

Used by cache_latents.py, train_dreambooth.py (it builds what is missing with the same functions) and
evaluate.py (its eval-loss images). Every file is safetensors with a provenance record in its metadata (the
source image's fingerprint, its crop, the encoder's identity, a format version): a file whose record does not
match what would be written now is stale and recomputed, never trusted. Writes are atomic and batches fixed, so a
killed run that is run again writes byte-identical files.
"""

import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from common import families, files, images, models

CACHE_FORMAT_VERSION = "1"
# Bump when encode_prompt changes what it computes, so old text caches are recomputed rather than trusted.
TEXT_ENCODING_VERSION = "1"


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
    files.save_safetensors_atomic(tensors, path, {"cache": files.canonical_json(metadata)})


# ---------------------------------------------------------------------------------------------------------------------
# VAE latents


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
            image = images.image_to_tensor(images.apply_transform(images.load_image(entry.path), entry.transform))
        except ValueError as err:
            errors.append((entry, err))
            continue
        try:
            mask = images.mask_to_latent_grid(images.load_mask(entry.mask_path), entry.transform, latent_factor) \
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
    A family without a VAE (IF) caches the resized, cropped picture itself as the "mean", in [-1, 1], with its mask
    at full resolution: the cache still does the decoding, resizing and checks once, so every training step
    reads a small tensor (as fast as a latent) instead of decoding a photo.
    Returns (usable entries, number of latents written)."""
    vae_identity = "pixels" if info.pixels else models.component_identity(info, "vae")
    kind = "pictures (no VAE: the model works on pixels)" if info.pixels else "latents"
    for folder in {os.path.dirname(e.cache_path) for e in entries}:
        files.remove_stale_temporaries(folder)
    stale = set()
    for entry in entries:
        entry.fingerprint = files.file_fingerprint(entry.path)
        entry.mask_fingerprint = files.file_fingerprint(entry.mask_path) if entry.mask_path else None
        if not cache_metadata_matches(entry.cache_path, vae_cache_metadata(entry, vae_identity)):
            stale.add(entry.path)
    if not stale:
        print_fn(f"VAE cache: all {len(entries)} {kind} are up to date; nothing to encode")
        return entries, 0

    print_fn(f"VAE cache: {'caching' if info.pixels else 'encoding'} {len(stale)} of {len(entries)} images")
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
                if info.pixels:
                    encoded = [{"mean": picture} for picture in pixels]
                else:
                    if vae is None:
                        vae = models.load_vae(info, device).eval()
                    with torch.no_grad():
                        dist = vae.encode(torch.stack(pixels).to(device, vae.dtype)).latent_dist
                    encoded = [{"mean": mean.float(), "std": std.float()} for mean, std in zip(dist.mean, dist.std)]
                for i, entry in enumerate(decoded):
                    if entry.path not in stale:  # up-to-date companions were encoded for their company only
                        continue
                    tensors = encoded[i]
                    if masks[i] is not None:  # the mask travels with its latent: one file, one fingerprint
                        tensors["mask"] = masks[i]
                        if masks[i].max() == 0:
                            print_fn(f"warning: the mask {entry.mask_path} of {entry.path} is all black: this image "
                                     "adds nothing to the loss")
                    save_cache_file(tensors, entry.cache_path, vae_cache_metadata(entry, vae_identity))
                    written += 1
            bar.update(sum(e.path in stale for e in batch))
    return [e for e in entries if e.path not in failed], written


# ---------------------------------------------------------------------------------------------------------------------
# Text embeddings


def text_encoder_identity(info):
    """What the cached embeddings depend on: the encoders, their precisions, T5's length, the stored dtype."""
    parts = [f"{info.family}|{TEXT_ENCODING_VERSION}"]
    if info.t5_max_length:
        parts.append(f"t5 {info.t5_max_length}")
    if info.text_dtype != torch.float32:
        parts.append(str(info.text_dtype))
    for tokenizer_name, encoder_name in info.text_parts:
        parts += [models.component_identity(info, tokenizer_name), models.component_identity(info, encoder_name),
                  info.text_encoder_precisions.get(encoder_name) or "no_change"]  # a quantised encoder embeds otherwise
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def text_cache_path(cache_dir, caption, identity):
    # One file per (caption, text-encoder identity): the same folder can serve several models without confusion.
    return os.path.join(cache_dir, hashlib.sha256(f"{identity}\n{caption}".encode()).hexdigest()[:32] + ".safetensors")


def refuse_foreign_text_cache(cache_dir, info):
    """A folder holding the text embeddings of a family that encodes prompts otherwise invites mixing them up (the
    SDXL base embeds prompts with both text encoders, the refiner with the second alone): it is refused."""
    if not info.foreign_text_caches or not os.path.isdir(cache_dir):
        return
    for name in sorted(os.listdir(cache_dir)):
        other = (cache_metadata(os.path.join(cache_dir, name)) or {}).get("family") if name.endswith(".safetensors") \
            else None
        if other in info.foreign_text_caches:
            raise SystemExit(f"{cache_dir} holds {families.BY_NAME[other].title} text embeddings ({name}); the "
                             f"{info.title} encodes prompts otherwise, so each needs its own text cache: give this run "
                             "another text_embeds cache_dir (or --cache_dir). VAE caches can be shared.")


def build_text_cache(captions, info, cache_dir, device="cpu", batch_size=16, print_fn=print):
    """Encode every caption that has no up-to-date file in cache_dir, stored in info.text_dtype (the training
    compute dtype, --mixed_precision: T5 sequences are large). Returns {caption: cache path}."""
    identity = text_encoder_identity(info)
    dtype = info.text_dtype
    files.remove_stale_temporaries(cache_dir)
    refuse_foreign_text_cache(cache_dir, info)
    paths = {caption: text_cache_path(cache_dir, caption, identity) for caption in sorted(set(captions))}
    expected = {"format_version": CACHE_FORMAT_VERSION, "text_encoder": identity, "family": info.family}
    todo = [c for c, p in paths.items() if not cache_metadata_matches(p, {**expected, "caption": c})]
    if not todo:
        print_fn(f"text cache: all {len(paths)} caption embeddings are up to date; nothing to encode")
        return paths
    print_fn(f"text cache: encoding {len(todo)} of {len(paths)} captions")
    tokenizers, encoders = models.load_text_encoders(info, device)
    for start in tqdm(range(0, len(todo), batch_size), desc="caching text embeddings", unit="batch"):
        chunk = todo[start:start + batch_size]
        embeds = info.encode_prompt(tokenizers, encoders, chunk)
        if start == 0:
            size = sum(value[0].numel() for value in embeds.values()) * torch.finfo(dtype).bits // 8
            shape = "x".join(map(str, embeds["prompt_embeds"].shape[1:]))
            print_fn(f"text cache: {shape} {str(dtype).split('.')[-1]} per caption ({size / 2 ** 20:.2f} MiB each, "
                     f"{size * len(paths) / 2 ** 20:.1f} MiB for {len(paths)} captions) in {cache_dir}")
        for i, caption in enumerate(chunk):
            save_cache_file({name: value[i].to(dtype) for name, value in embeds.items()}, paths[caption],
                            {**expected, "caption": caption})
    return paths


def load_text_embeddings(captions, info, cache_dir):
    """{caption: its cached embeddings} for every caption (each file read once)."""
    identity = text_encoder_identity(info)
    return {caption: files.load_tensors(text_cache_path(cache_dir, caption, identity)) for caption in set(captions)}
