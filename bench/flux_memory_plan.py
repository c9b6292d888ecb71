"""A memory plan for a FLUX.1-dev LoRA on one GPU: which flags fit a 24 GB and a 16 GB card. A plan, not a
measurement on a GPU: every term is counted or measured on this machine, the sum is arithmetic.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/flux_memory_plan.py
    HF_HUB_OFFLINE=1 .venv/bin/python bench/flux_memory_plan.py --lora_rank 32 --lora_target attention_ff

The terms, for batch 1 and T5 at 512 tokens:
    weights      FLUX.1-dev's transformer, T5-XXL, CLIP-L and the VAE built from their published configs on the
                 meta device (no memory, exact parameter counts); each Linear weight at the bytes per weight that
                 --base_model_precision / --text_encoder_2_precision give, measured here by quantising real-width
                 Linear layers (3072 x 3072) with quantise.quantize_model and counting their storage as
                 bench_memory.py does; every other tensor in bf16.
    LoRA         the trainable parameters of our peft LoRA on the meta transformer (adapters.add_lora), at 16
                 bytes each: fp32 weight, fp32 gradient and AdamW's two fp32 moments (10 with --use_8bit_adam).
    activations  what autograd keeps for the backward pass, read with saved-tensor hooks from a forward pass on the
                 meta device with the real widths (3072 wide, 24 heads of 128) at the real token counts, with the
                 LoRA on (so the graph is the training one) and the weights excluded. Per block from models of
                 1+1, 2+1 and 1+2 blocks; scaled to 19 double- and 38 single-stream blocks. Attention is counted
                 as a GPU's flash / memory-efficient kernel keeps it (q, k, v, the output and the log-sum-exp per
                 row), not as the CPU's math path (which would keep 24 x N x N scores). With
                 --gradient_checkpointing: each block's inputs, plus one block's activations recomputed at a time.
    validation   with --offload_frozen the text encoders and VAE stay in system memory and visit the GPU only to
                 render: the peak then holds the transformer, the LoRA's optimiser state and the largest visitor
                 (T5) beside inference activations (taken as those of one block at 1024 px without gradients:
                 small).
    overhead     1.0 GiB for the CUDA context, cuBLAS workspaces and allocator fragmentation (an assumption).
"""

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

GiB = 2 ** 30
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_gated_act=True)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77)
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)
PRECISIONS = ("no_change", "int8-quanto", "fp8-quanto", "int4-quanto", "nf4-bnb")
TEXT_TOKENS = 512
OVERHEAD = 1.0 * GiB


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--lora_target", default="attention", choices=["attention", "attention_ff", "all"])
    return parser.parse_args(argv)


def on_meta(build):
    import torch

    with torch.device("meta"):
        return build()


def linear_split(model):
    """(Linear weight count, every other parameter count) of a model."""
    import torch

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return linear, sum(p.numel() for p in model.parameters()) - linear


def bytes_per_weight():
    """Bytes per Linear weight of each precision, measured on real-width layers quantised as training does it."""
    import torch

    from bench_memory import storage_bytes
    from common import quantise

    result = {}
    for precision in PRECISIONS:
        torch.manual_seed(0)
        layers = torch.nn.Sequential(*(torch.nn.Linear(3072, 3072) for _ in range(2))).to(torch.bfloat16)
        quantise.quantize_model(layers, precision, torch.bfloat16)
        weights = [layer.weight for layer in layers]
        result[precision] = storage_bytes(weights) / (2 * 3072 * 3072)
    return result


class FlashAttentionLike:
    """Stands in for F.scaled_dot_product_attention while counting: what a GPU's flash kernel keeps for backward
    (q, k, v, the output and a float32 log-sum-exp per query row), with the output's shape."""

    def __init__(self):
        import torch

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, query, key, value):
                output = torch.empty_like(query)
                ctx.save_for_backward(query, key, value, output,
                                      query.new_empty(query.shape[:-1], dtype=torch.float32))
                return output

            @staticmethod
            def backward(ctx, grad):  # never run: the graph is only counted
                raise NotImplementedError

        self.function = Function

    def __call__(self, query, key, value, *args, **kwargs):
        return self.function.apply(query, key, value)


def saved_bytes(double, single, tokens, args):
    """Bytes autograd saves in a LoRA training forward of a meta FLUX.1-dev transformer with this many blocks."""
    import torch
    import torch.nn.functional as F
    from diffusers import FluxTransformer2DModel

    from common import adapters, families

    model = on_meta(lambda: FluxTransformer2DModel(**{**FLUX_DEV, "num_layers": double,
                                                      "num_single_layers": single})).to(torch.bfloat16)
    model.requires_grad_(False)
    adapters.add_lora(model, adapters.LoraSettings(rank=args.lora_rank, init="default"),
                      families.Flux.lora_targets(model, args.lora_target))
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, device="meta", dtype=dtype)

    real_attention, F.scaled_dot_product_attention = F.scaled_dot_product_attention, FlashAttentionLike()
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            model(hidden_states=meta(1, tokens, 64), encoder_hidden_states=meta(1, TEXT_TOKENS, 4096),
                  pooled_projections=meta(1, 768), timestep=meta(1, dtype=torch.float32),
                  guidance=meta(1, dtype=torch.float32), img_ids=meta(tokens, 3, dtype=torch.float32),
                  txt_ids=meta(TEXT_TOKENS, 3, dtype=torch.float32), return_dict=False)
    finally:
        F.scaled_dot_product_attention = real_attention
    return sum(saved.values())


def activations(tokens, args):
    """(without, with gradient checkpointing) activation bytes of the full model, and the per-block parts."""
    base = saved_bytes(1, 1, tokens, args)
    double = saved_bytes(2, 1, tokens, args) - base
    single = saved_bytes(1, 2, tokens, args) - base
    outside = base - double - single
    full = outside + 19 * double + 38 * single
    width = FLUX_DEV["num_attention_heads"] * FLUX_DEV["attention_head_dim"]
    inputs = 2 * width * (tokens + TEXT_TOKENS)  # bf16 hidden states of both streams entering a block
    checkpointed = outside + (19 + 38) * inputs + max(double, single)
    return full, checkpointed, {"per double block": double, "per single block": single, "outside blocks": outside}


def lora_parameters(args):
    """Trainable parameters of our LoRA (--lora_rank, --lora_target) on FLUX.1-dev's transformer."""
    from diffusers import FluxTransformer2DModel

    from common import adapters, families

    model = on_meta(lambda: FluxTransformer2DModel(**FLUX_DEV))
    model.requires_grad_(False)
    adapters.add_lora(model, adapters.LoraSettings(rank=args.lora_rank, init="default"),
                      families.Flux.lora_targets(model, args.lora_target))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_peak(args, precision, resolution):
    """The plan's peak of a training step alone (no validation visit), with --gradient_checkpointing: the
    transformer at `precision`, the LoRA with AdamW, the checkpointed activations and the overhead (bytes)."""
    from diffusers import FluxTransformer2DModel

    linear, other = linear_split(on_meta(lambda: FluxTransformer2DModel(**FLUX_DEV)))
    transformer = linear * bytes_per_weight()[precision] + other * 2
    _, checkpointed, _ = activations((resolution // 16) ** 2, args)
    return transformer + 16 * lora_parameters(args) + OVERHEAD + checkpointed


def main(argv=None):
    args = parse_args(argv)
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    counts = {"transformer": linear_split(on_meta(lambda: FluxTransformer2DModel(**FLUX_DEV))),
              "T5-XXL": linear_split(on_meta(lambda: T5EncoderModel(T5Config(**T5_XXL)))),
              "CLIP-L": linear_split(on_meta(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)))),
              "VAE": (0, sum(p.numel() for p in on_meta(lambda: AutoencoderKL(**FLUX_VAE)).parameters()))}
    print("parameters (from the published configs, on the meta device):")
    for name, (linear, other) in counts.items():
        print(f"  {name:12s} {(linear + other) / 1e9:6.2f} B  ({linear / 1e9:.2f} B in Linear layers)")
    per_weight = bytes_per_weight()
    print("bytes per Linear weight (real-width layers quantised as in training):  "
          + "   ".join(f"{p} {b:.3f}" for p, b in per_weight.items()))

    def weights(name, precision):
        linear, other = counts[name]
        return linear * per_weight[precision] + other * 2

    plans = {}
    for size in (512, 1024):
        tokens = (size // 16) ** 2
        full, checkpointed, parts = activations(tokens, args)
        plans[size] = full, checkpointed
        print(f"activations at {size} px ({tokens} image + {TEXT_TOKENS} text tokens), LoRA {args.lora_target} "
              f"rank {args.lora_rank}: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in parts.items())
              + f"; whole model {full / GiB:.1f} GiB, with --gradient_checkpointing {checkpointed / GiB:.2f} GiB")
    lora = lora_parameters(args)
    print(f"LoRA: {lora / 1e6:.1f} M trainable parameters: {16 * lora / GiB:.2f} GiB with AdamW "
          f"({10 * lora / GiB:.2f} GiB with --use_8bit_adam)")

    print(f"\nplan (GiB; batch 1, --gradient_checkpointing, --offload_frozen, cached latents and embeddings, "
          f"{OVERHEAD / GiB:.1f} GiB overhead):")
    print(f"  {'--base_model_precision':24s} {'transformer':>11s} {'T5 int8 visit':>13s} "
          f"{'train 512 px':>12s} {'train 1024 px':>13s} {'peak 512':>9s} {'peak 1024':>9s}  fits")
    for precision in PRECISIONS:
        if precision == "fp8-quanto":
            continue  # the same bytes as int8
        transformer = weights("transformer", precision)
        visit = weights("T5-XXL", "int8-quanto") + weights("CLIP-L", "no_change") + weights("VAE", "no_change")
        steady = transformer + 16 * lora + OVERHEAD
        peaks = {size: steady + max(plans[size][1], visit) for size in (512, 1024)}
        fits = [f"{card} GB at {'/'.join(str(s) for s in (512, 1024) if peaks[s] <= card * 1e9 * 0.95)} px"
                for card in (24, 16) if peaks[512] <= card * 1e9 * 0.95]
        print(f"  {precision:24s} {transformer / GiB:11.1f} {visit / GiB:13.1f} {plans[512][1] / GiB:12.1f} "
              f"{plans[1024][1] / GiB:13.1f} {peaks[512] / GiB:9.1f} {peaks[1024] / GiB:9.1f}  "
              + ("; ".join(fits) or "neither card"))
    print("(a card 'fits' when the plan stays under 95 % of its capacity; the T5 visit is --text_encoder_2_precision "
          "int8-quanto during validation; without --offload_frozen add it to every step)")


if __name__ == "__main__":
    main()
