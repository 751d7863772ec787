#!/usr/bin/env python3
"""PyTorch/diffusers side of tests/gpu/run.sh: ms per step of diffusers' SD3Transformer2DModel
with random weights, in the shapes benches/transformer_step.rs gives the DPIR transformer.

Default: SD3-medium (24 blocks, 24 heads x 64 = 1536 wide, joint_attention_dim 4096, pooled 2048),
a 128x128 latent (1024x1024 output: 4096 image tokens) and 333 context tokens, bf16, on CUDA.
Every size can be made small for a CPU check of the script itself:

    python3 tests/gpu/sd3_step.py --device cpu --dtype f32 --layers 2 --heads 4 --latent 16 --iters 2

Prints a `RESULT impl=pytorch ...` line (ms/step, TFLOP/s, peak memory) that run.sh reads.
"""
import argparse
import time

import torch
from diffusers import SD3Transformer2DModel


def step_flops(layers, width, n_img, n_ctx, joint_dim=4096, in_ch=16, patch=2, out_ch=16):
    """Multiply-adds x 2 of one transformer call (matmuls and attention; norms, adaLN modulation
    on one token and element-wise work left out). The last block is `context_pre_only`: its context
    stream has Q/K/V projections only (no output projection, no feed-forward)."""
    d = width
    n = n_img + n_ctx
    proj = lambda tokens: 2 * tokens * d * d  # one d x d linear
    ff = lambda tokens: 2 * (2 * tokens * d * 4 * d)  # d -> 4d -> d
    attn = 2 * (2 * n * n * d)  # QK^T and PV, all heads
    full = 4 * proj(n) + ff(n) + attn  # QKV + out, ff, attention (image and context)
    last = 4 * proj(n_img) + ff(n_img) + 3 * proj(n_ctx) + attn
    total = (layers - 1) * full + last
    total += 2 * n_img * (in_ch * patch * patch) * d  # patch embedding
    total += 2 * n_ctx * joint_dim * d  # context embedder
    total += 2 * n_img * d * (patch * patch * out_ch)  # proj_out
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--latent", type=int, default=128, help="latent side (128 = 1024x1024 pixels)")
    ap.add_argument("--ctx", type=int, default=333, help="context tokens (T5 + CLIP/visual prompt)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    dev = torch.device(args.device)
    width = args.heads * args.head_dim
    torch.manual_seed(0)
    # Random weights generated on the spot (diffusers' own init), straight in the target dtype.
    with torch.device(dev):
        model = SD3Transformer2DModel(
            sample_size=args.latent,
            patch_size=2,
            in_channels=16,
            num_layers=args.layers,
            attention_head_dim=args.head_dim,
            num_attention_heads=args.heads,
            joint_attention_dim=4096,
            caption_projection_dim=width,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=max(192, args.latent),
        )
    model = model.to(device=dev, dtype=dtype).eval()
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the f32 weights of the init: not part of a step's memory
    print("PEAKMEM RESET", flush=True)  # tests/gpu/peakmem.py: the measured phase starts
    params = sum(p.numel() for p in model.parameters())

    x = torch.randn(1, 16, args.latent, args.latent, device=dev, dtype=dtype)
    ctx = torch.randn(1, args.ctx, 4096, device=dev, dtype=dtype)
    pooled = torch.randn(1, 2048, device=dev, dtype=dtype)
    t = torch.tensor([857.6923], device=dev, dtype=dtype)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def step():
        return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                     return_dict=False)[0]

    with torch.inference_mode():
        for _ in range(args.warmup):
            step()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            out = step()
            sync()
            times.append(time.perf_counter() - t0)
    assert out.shape == x.shape, out.shape
    assert torch.isfinite(out.float()).all(), "non-finite output"
    times.sort()
    ms = times[len(times) // 2] * 1e3
    n_img = (args.latent // 2) ** 2
    flops = step_flops(args.layers, width, n_img, args.ctx)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else float("nan")
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    attn = "torch SDPA (F.scaled_dot_product_attention)"
    print(f"PyTorch {torch.__version__} / diffusers SD3Transformer2DModel on {name}: {args.layers} blocks x {width} wide, "
          f"{n_img} image + {args.ctx} context tokens, {args.dtype}, {params / 1e9:.2f} B params, attention: {attn}")
    print(f"  step (median of {args.iters}): {ms:.2f} ms  [{', '.join(f'{v * 1e3:.1f}' for v in times)}]")
    print(f"  {flops / 1e12:.2f} TFLOP/step -> {flops / (ms / 1e3) / 1e12:.1f} TFLOP/s")
    print(f"  peak allocated by torch: {peak:.2f} GiB")
    print(f"RESULT impl=pytorch ms_per_step={ms:.3f} tflop_per_step={flops / 1e12:.4f} "
          f"tflops={flops / (ms / 1e3) / 1e12:.2f} peak_alloc_gib={peak:.3f}")


if __name__ == "__main__":
    main()
