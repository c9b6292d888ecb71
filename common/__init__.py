"""What the scripts share, one concern per module, and which scripts use it. Nothing here runs on its own.

    files        atomic writes, fingerprints, JSON, no pickles, outputs kept inside their folders
                   used by train, evaluate, masks, regularisation (and every module)
    flags        --config FILE.json, the shared flag groups, true/false flags
                   used by every script
    simpletuner  a SimpleTuner config.json given to --config: its keys in our terms, refused or passed over
                   used by every script (through flags)
    data         the data config, discovery, captions, mask pairing, each image's plan
                   used by cache, train, evaluate, masks, rare tokens
    images       reading pictures safely, aspect buckets and crops, grids and contact sheets
                   used by train, evaluate, masks, regularisation, rare tokens
    models       find a base model, detect its family, load its parts, build its pipeline
                   used by train, evaluate, regularisation, rare tokens (cache through caches)
    families/    one file per model family: detection, text encoding, conditioning, the denoiser call, drawing,
                 LoRA presets and layouts, single files, what the card says (its __init__ lists the interface)
                   used by every script (through models)
    single_file  a single .safetensors checkpoint, converted once to a diffusers folder
                   used by every script that loads a model (through models)
    objectives   noise prediction (DDPM) or flow matching: timesteps, targets, weights, rollout steps
                   used by train, evaluate
    quantise     quantised frozen weights (--base_model_precision, --text_encoder_N_precision)
                   used by cache, train, evaluate, regularisation
    caches       VAE latents and text embeddings on disk
                   used by cache, train, evaluate
    adapters     LoRA (DoRA) / LyCORIS: add, switch off, scale, save (diffusers and kohya layouts), load
                   used by train, evaluate, regularisation
    checkpoints  checkpoints, exact resume, sharded (FSDP) saving, the training log, a full fine-tune's pipeline
                   used by train, evaluate
    cards        beside the weights: metadata other tools read, args.json, the model card
                   used by train
    optimisers   the optimiser: AdamW, 8-bit AdamW, Prodigy or Adafactor
                   used by train
    scores       the stable eval loss, CLIP-T / CLIP-I / DINO, DreamBench prompts
                   used by train, evaluate, rare tokens
    render       every prompt at fixed seeds, its grid, validation previews
                   used by train, evaluate
    report       evaluate.py's report.html: scores, plots, pictures
                   used by evaluate
    webhooks     notices to your own endpoint or Discord
                   used by train
    hub          the Hugging Face hub: a base model or VAE fetched by its id; --push_to_hub: the output folder as a
                 model repo
                   used by every script that loads a model (through models), train

A script imports the modules it needs (`from common import data, models`) and calls them by module, so a call
says where its code lives: `data.load_datasets(args)`, `caches.build_vae_cache(...)`.
"""

import logging

# bitsandbytes (imported by peft) warns on every CPU start that an optional kernel package is missing; it changes
# nothing for training, so it is kept out of the way of messages that matter.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# transformers says, once per image-processor class diffusers imports, that torchvision is missing; this project
# does all image work with PIL and deliberately has no torchvision.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
