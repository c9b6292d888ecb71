"""The optimiser (--optimizer): AdamW, its bitsandbytes 8-bit form, Prodigy or Adafactor, over the trainable weights.

Used by train_dreambooth.py. Every one's state is a plain state_dict, so checkpoints hold it and a resumed run ends
bit-identical to an uninterrupted one whichever is chosen.
"""

import importlib.util
import os

import torch

PACKAGES = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}  # the optional packages they come from


def check_args(args):
    """Before any model work: --use_8bit_adam (diffusers' examples' flag) means adamw8bit; the optimiser's package
    must be installed; Prodigy with a small learning rate (the usual mistake) is warned about."""
    if args.use_8bit_adam and args.optimizer not in ("adamw", "adamw8bit"):
        raise SystemExit(f"--use_8bit_adam means --optimizer adamw8bit, but --optimizer {args.optimizer} was given "
                         "too: keep one of them")
    if args.use_8bit_adam:
        args.optimizer = "adamw8bit"
    package = PACKAGES.get(args.optimizer)
    if package and importlib.util.find_spec(package) is None:
        raise SystemExit(f"--optimizer {args.optimizer} needs {package}: pip install {package}")
    if args.optimizer == "prodigy" and args.learning_rate < 0.1 and int(os.environ.get("RANK", "0")) == 0:
        smaller = f"about {1 / args.learning_rate:,.0f} times smaller" if args.learning_rate > 0 else "zero"
        print(f"warning: Prodigy finds its own step size and --learning_rate multiplies it: 1.0 is the usual value; "
              f"{args.learning_rate:g} makes every step {smaller}")


def make(args, trainable):
    """The --optimizer over the `trainable` {name: parameter}, with the --learning_rate and --adam_* settings; the
    trained text encoders' LoRA (--train_text_encoder) in a group of its own at --text_encoder_lr."""
    from common.adapters import TRAINED_TEXT_ENCODERS

    text = [p for name, p in trainable.items() if name.startswith(TRAINED_TEXT_ENCODERS + ".")]
    params = [{"params": [p for name, p in trainable.items() if not name.startswith(TRAINED_TEXT_ENCODERS + ".")]}]
    if text:
        params.append({"params": text, "lr": args.learning_rate if args.text_encoder_lr is None
                       else args.text_encoder_lr})
    betas = (args.adam_beta1, args.adam_beta2)
    if args.optimizer == "prodigy":  # diffusers' examples' settings: bias correction, safeguarded warm-up
        from prodigyopt import Prodigy

        return Prodigy(params, lr=args.learning_rate, betas=betas, weight_decay=args.adam_weight_decay,
                       eps=args.adam_epsilon, use_bias_correction=True, safeguard_warmup=True)
    if args.optimizer == "adafactor":  # a fixed learning rate (no relative steps), so the lr schedule applies
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    optimizer_class = torch.optim.AdamW
    if args.optimizer == "adamw8bit":
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    return optimizer_class(params, lr=args.learning_rate, betas=betas, weight_decay=args.adam_weight_decay,
                           eps=args.adam_epsilon)
