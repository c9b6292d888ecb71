"""Quantised frozen weights: --base_model_precision and --text_encoder_N_precision.

Used by the model loaders (models.py) for the UNet and text encoders, and by the flag checks of the scripts that
load a model in a chosen precision (cache_latents, train_dreambooth, evaluate, make_regularisation). The
order is always load -> quantise -> freeze -> (adapter on top), so the adapter trains in full precision against
quantised base weights and is saved under the ordinary layer names.
"""

import ctypes
import gc

import torch

PRECISIONS = ("no_change", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "fp8-torchao", "nf4-bnb")


def check_precision(precision, flag):
    """Refuse, before any model work, a precision this machine or install cannot run."""
    if precision == "fp8-torchao":
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
            raise SystemExit(f"{flag} fp8-torchao needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); "
                             "this machine has none. Use fp8-quanto or int8-quanto.")
        try:
            from torchao.quantization import Float8WeightOnlyConfig, quantize_  # noqa: F401
        except ImportError:
            raise SystemExit(f"{flag} fp8-torchao needs a torchao with Float8WeightOnlyConfig: pip install -U torchao") \
                from None
    if precision.endswith("-quanto"):
        try:
            import optimum.quanto  # noqa: F401
        except ImportError:
            raise SystemExit(f"{flag} {precision} needs optimum-quanto: pip install optimum-quanto") from None
    if precision == "nf4-bnb":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SystemExit(f"{flag} nf4-bnb needs bitsandbytes: pip install bitsandbytes") from None


def check_text_encoder_precisions(args):
    for i in (1, 2, 3):
        check_precision(getattr(args, f"text_encoder_{i}_precision"), f"--text_encoder_{i}_precision")


def to_nf4(module, compute_dtype):
    """Swap every nn.Linear for a bitsandbytes 4-bit NF4 layer, in place. (diffusers' own bitsandbytes loader
    refuses the CPU; done by hand the same layers work on CPU and GPU alike.) Attribute names stay, so an adapter
    trained on top is saved against the ordinary layer names."""
    import bitsandbytes as bnb

    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear) and not isinstance(child, bnb.nn.Linear4bit):
            # LinearNF4 (not a generic Linear4bit): LyCORIS recognises it and adapts it in bypass mode.
            quantized = bnb.nn.LinearNF4(child.in_features, child.out_features, bias=child.bias is not None,
                                         compute_dtype=compute_dtype)
            quantized.weight = bnb.nn.Params4bit(child.weight.data.to(compute_dtype), requires_grad=False,
                                                 quant_type="nf4")
            if child.bias is not None:
                quantized.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(module, name, quantized.to(child.weight.device))
        else:
            to_nf4(child, compute_dtype)


def quantize_model(model, precision, compute_dtype=torch.float32):
    """Quantise a model's weights in place and freeze it (load -> quantise -> freeze; adapters come after)."""
    if precision in (None, "no_change"):
        return model
    if precision.endswith("-quanto"):
        from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantize

        quantize(model, weights={"int8": qint8, "int4": qint4, "int2": qint2, "fp8": qfloat8}[precision.split("-")[0]])
        freeze(model)
    elif precision == "nf4-bnb":
        to_nf4(model, compute_dtype)
    elif precision == "fp8-torchao":
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

        quantize_(model, Float8WeightOnlyConfig())
    else:
        raise ValueError(f"unknown precision {precision!r}")
    release_freed_memory()
    return model.requires_grad_(False)  # quantised layers come with fresh parameters: freeze after, not before


def release_freed_memory():
    """Hand memory freed by quantisation back to the system. glibc keeps freed heap for reuse, so without this a
    quantised model's process holds as much host RAM as the full-precision one did (measured: 2.9 GB of heap
    before, 0.75 GB after, for a 2 GB UNet quantised to int8)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        pass
