"""Cache VAE latents and text embeddings to disk, so training runs the VAE and text encoders never again.

    python cache_latents.py --config config.json
    python cache_latents.py --pretrained_model_name_or_path MODEL --instance_data_dir subject/ --instance_prompt "ohwx dog"

Reads the same config.json as train_dreambooth.py (its training keys are passed over here) and the data config.
Writes, per image and bucket, one safetensors file in the dataset's cache_dir_vae (latent mean and std, plus the
source fingerprint, the resize/crop transform and the VAE identity as metadata), and one safetensors file per
caption in the text_embeds cache_dir. Entries that are up to date are skipped without loading any model; a
touched or replaced image, a changed crop setting or another VAE makes exactly the affected entries stale.
A model without a VAE (DeepFloyd IF, in pixel space) gets each picture itself, resized and cropped to its bucket,
in [-1, 1], in place of the latent (its mask at full resolution): the photos are decoded and checked once.
train_dreambooth.py calls the same functions, so running this first is optional.
"""

import argparse

import torch

from common import caches, data, flags, quantise


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=flags.HelpFormatter)
    flags.add_model_args(parser)
    flags.add_data_args(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the VAE and text encoders run")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"],
                        help="the training run's: text embeddings are stored in its compute dtype")
    # A training config.json also holds training flags: not ours, but not typos either.
    return flags.parse_args_with_config(parser, argv, also_known=flags.TRAINING_KEYS)


def main(argv=None):
    args = parse_args(argv)
    quantise.check_text_encoder_precisions(args)
    datasets, info, plans = data.prepare(args)
    encoded, captions = 0, []
    for dataset in datasets:
        if dataset.id not in plans:
            continue
        print(f"dataset {dataset.id!r}: {len(plans[dataset.id])} images -> {dataset.cache_dir_vae}")
        plans[dataset.id], count = caches.build_vae_cache(plans[dataset.id], info, args.device, args.vae_batch_size)
        encoded += count
        captions += [c for e in plans[dataset.id] for c in e.captions]
    caches.build_text_cache(captions, info, data.text_cache_dir(datasets, args), args.device)
    print(f"done: {encoded} latents encoded, {sum(len(p) for p in plans.values())} images cached in all")
    return plans


if __name__ == "__main__":
    main()
