#!/usr/bin/env python3
"""PyTorch/diffusers side of benches/compare_pytorch.sh (run that, not this).

Rows: per case, the DPIR transformer forward (and its control branch, and a step with the
control precomputed), the VAE decoder and encoder; and one whole dpir-nano frame of the 1906
film at x2 (the element's per-frame path: prompts, encode, 1 step in latent tiles, decode,
wavelet colour fix; PyTorch = weights/train/model.py's copy of it, same noise). FLOPs of each row
are counted on the PyTorch side (torch.utils.flop_counter: matrix products, convolutions,
attention); both sides' GFLOP/s are printed next to this machine's f32 matrix-product peak,
measured in the same run (2048^3 GEMM on each side).

  prepare WORK [--no-medium]   write WORK/spec.json, inputs and (medium case) random weights
  torch   WORK LOG             time the PyTorch side (RESULT lines to LOG, outputs to WORK)
  table   WORK ROUNDS          print the table from WORK/{rust,torch}.{0..ROUNDS-1}.log + outputs

Cases:
  tiny   - the fixtures' tiny configuration and weights (dpir_transformer_square, sd3_vae), the
           fixtures' own inputs (batch 1: the first sample of the transformer case).
  medium - random weights generated here: transformer 2 layers x 512 wide (8 heads x 64),
           joint_attention_dim 4096, pooled 2048 (SD3's), latent 64x64 (1024 image tokens) + 333
           context tokens; VAE block_out_channels [64,128,256,256], 32 groups, latent 16x16 ->
           128x128 image.

PyTorch transformer = diffusers 0.29.2 `SD3Transformer2DModel` + DPIR's control branch:
`control_conv` (Conv3x3 -> GN(4) -> Conv3x3/2 -> GN(8) -> Conv3x3 -> GN(8), as the official
models/transformer_sd3_cnext.py) and its mean/std alignment added to the image stream after block
0 through a forward hook on transformer_blocks[0]. For the tiny case the output is checked
against the fixture's `sample` (produced by the official DPIR code), so the hook version computes
exactly what DPIR computes.
"""

import json
import os
import statistics
import sys
import time

import subprocess

import numpy as np
import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "weights", "train"))

FIXTURES = os.environ.get("DPIR_FIXTURES", os.path.join(HERE, "..", "..", "shared", "fixtures"))
MEDIA = os.environ.get("DPIR_MEDIA", os.path.join(HERE, "..", "..", "shared", "media"))
NANO = os.path.join(HERE, "..", "weights", "dpir-nano")
GEMM_N = 2048
CTX_TOKENS = 333


# ----------------------------------------------------------------------------------------------
# DPIR transformer on diffusers


def control_conv(in_ch, inner):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(in_ch, 256, 3, stride=1, padding=1),
        nn.GroupNorm(4, 256, eps=1e-5),
        nn.Conv2d(256, 512, 3, stride=2, padding=1),
        nn.GroupNorm(8, 512, eps=1e-5),
        nn.Conv2d(512, inner, 3, stride=1, padding=1),
        nn.GroupNorm(8, inner, eps=1e-5),
    )


def align(c, h):
    """DPIR's adaptive alignment: one mean/std (unbiased) per sample over tokens x channels."""
    dims = tuple(range(1, c.dim()))
    mc, sc = c.mean(dim=dims, keepdim=True), c.std(dim=dims, keepdim=True)
    mh, sh = h.mean(dim=dims, keepdim=True), h.std(dim=dims, keepdim=True)
    return (c - mc) / (sc + 1e-9) * sh + mh


class DpirTorch(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        self.sd3 = SD3Transformer2DModel(**cfg)
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        self.control_conv = control_conv(cfg["in_channels"], inner)
        self._control = None
        self.sd3.transformer_blocks[0].register_forward_hook(self._after_block0)

    def _after_block0(self, module, args, output):
        ctx, h = output
        c = self._control.flatten(2).transpose(1, 2)  # b c h w -> b (h w) c
        return ctx, h + align(c, h)

    def load(self, state):
        cc = {k[len("control_conv."):]: v for k, v in state.items() if k.startswith("control_conv.")}
        rest = {k: v for k, v in state.items() if not k.startswith("control_conv.")}
        self.control_conv.load_state_dict(cc, strict=True)
        self.sd3.load_state_dict(rest, strict=True)
        return self

    def forward(self, hidden_states, controlnet_cond, encoder_hidden_states, pooled, timestep, control=None):
        self._control = self.control_conv(controlnet_cond) if control is None else control
        try:
            return self.sd3(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled,
                timestep=timestep,
                return_dict=False,
            )[0]
        finally:
            self._control = None

    def full_state_dict(self):
        sd = {k: v for k, v in self.sd3.state_dict().items()}
        sd.update({f"control_conv.{k}": v for k, v in self.control_conv.state_dict().items()})
        return {k: v.contiguous() for k, v in sd.items()}


def make_vae(cfg):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**cfg)


# ----------------------------------------------------------------------------------------------
# prepare


def prepare_real(work, real):
    """One case: the DPIR transformer of a real-size model directory (`benches/real_size.rs`
    writes one with random weights), one step at 4096 image + 333 context tokens, forward only."""
    mj = json.load(open(os.path.join(real, "model.json")))
    tcfg = {k: v for k, v in json.load(open(os.path.join(real, mj["transformer"]["config"]))).items()
            if not k.startswith("_")}
    torch.manual_seed(4)
    lat = 128  # 1024 px: 64 x 64 patches = 4096 tokens
    save_file(
        {
            "hidden_states": torch.randn(1, 16, lat, lat),
            "controlnet_cond": torch.randn(1, 16, lat, lat),
            "encoder_hidden_states": torch.randn(1, CTX_TOKENS, tcfg["joint_attention_dim"]),
            "pooled_projections": torch.randn(1, tcfg["pooled_projection_dim"]),
            "timestep": torch.tensor([857.6923]),
        },
        f"{work}/real.transformer_in.safetensors",
    )
    weights = os.path.join(real, mj["transformer"]["weights"][0])
    return [{"name": "real", "iters": 1, "rows": "forward",
             "transformer": {"weights": weights, "config": tcfg, "inputs": f"{work}/real.transformer_in.safetensors"}}]


def prepare(work, medium=True, real=None):
    os.makedirs(work, exist_ok=True)
    if real:
        cases = prepare_real(work, real)
        json.dump({"out_dir": work, "gemm_n": GEMM_N, "cases": cases}, open(f"{work}/spec.json", "w"), indent=1)
        print(f"{work}/spec.json")
        return
    cases = []

    # tiny: fixture weights and inputs
    tcase = json.load(open(f"{FIXTURES}/dpir_transformer_square/config.json"))
    vcase = json.load(open(f"{FIXTURES}/sd3_vae/config.json"))
    tio = load_file(f"{FIXTURES}/dpir_transformer_square/io.safetensors")
    vio = load_file(f"{FIXTURES}/sd3_vae/io.safetensors")
    names = ["hidden_states", "controlnet_cond", "encoder_hidden_states", "pooled_projections", "timestep"]
    save_file({n: tio[n][:1].contiguous() for n in names}, f"{work}/tiny.transformer_in.safetensors")
    save_file({"latent": vio["decode_latent"].contiguous(), "image": vio["image"].contiguous()},
              f"{work}/tiny.vae_in.safetensors")
    save_file(
        {"transformer_sample": tio["sample"][:1].contiguous(), "vae_decoded": vio["decoded"].contiguous()},
        f"{work}/tiny.expected.safetensors",
    )
    cases.append(
        {
            "name": "tiny",
            "iters": 10,
            "transformer": {
                "weights": f"{FIXTURES}/dpir_transformer_square/weights.safetensors",
                "config": tcase["library_config"],
                "inputs": f"{work}/tiny.transformer_in.safetensors",
            },
            "vae": {
                "weights": f"{FIXTURES}/sd3_vae/weights.safetensors",
                "config": vcase["library_config"],
                "inputs": f"{work}/tiny.vae_in.safetensors",
            },
        }
    )

    if medium:
        torch.manual_seed(3)
        tcfg = dict(
            sample_size=64, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
            num_attention_heads=8, joint_attention_dim=4096, caption_projection_dim=512,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=64,
        )
        vcfg = dict(vcase["library_config"])
        vcfg.update(block_out_channels=[64, 128, 256, 256], norm_num_groups=32, sample_size=128)
        tw, vw = f"{work}/medium.transformer.safetensors", f"{work}/medium.vae.safetensors"
        fresh = not (os.path.exists(tw) and os.path.exists(vw) and os.path.exists(f"{work}/medium.cfg.json")
                     and json.load(open(f"{work}/medium.cfg.json")) == [tcfg, vcfg])
        if fresh:
            with torch.no_grad():
                m = DpirTorch(tcfg)
                # PyTorch default inits (diffusers' SD3 zero-initialises nothing).
                save_file(m.full_state_dict(), tw)
                save_file({k: v.contiguous() for k, v in make_vae(vcfg).state_dict().items()}, vw)
            json.dump([tcfg, vcfg], open(f"{work}/medium.cfg.json", "w"))
        lat = 64
        save_file(
            {
                "hidden_states": torch.randn(1, 16, lat, lat),
                "controlnet_cond": torch.randn(1, 16, lat, lat),
                "encoder_hidden_states": torch.randn(1, CTX_TOKENS, tcfg["joint_attention_dim"]),
                "pooled_projections": torch.randn(1, tcfg["pooled_projection_dim"]),
                "timestep": torch.tensor([857.6923]),
            },
            f"{work}/medium.transformer_in.safetensors",
        )
        save_file({"latent": torch.randn(1, 16, 16, 16), "image": torch.rand(1, 3, 128, 128) * 2 - 1},
                  f"{work}/medium.vae_in.safetensors")
        cases.append(
            {
                "name": "medium",
                "iters": 3,
                "transformer": {"weights": tw, "config": tcfg, "inputs": f"{work}/medium.transformer_in.safetensors"},
                "vae": {"weights": vw, "config": vcfg, "inputs": f"{work}/medium.vae_in.safetensors"},
            }
        )

    # One dpir-nano frame: frame 40 of the 1906 film, x2 with Pillow's bicubic (the element's 8-bit
    # path), edges replicated to a multiple of 16, and the initial noise both sides start from.
    from PIL import Image
    film = os.path.join(MEDIA, "Shepard_Calais_1906_FrenchGP.ogv")
    raw = subprocess.run(["gst-launch-1.0", "-q", "filesrc", f"location={film}", "!", "decodebin", "!", "videoconvert",
                          "!", "video/x-raw,format=RGB,width=214,height=160", "!", "fdsink"],
                         check=True, capture_output=True).stdout
    frame = np.frombuffer(raw, np.uint8)[40 * 214 * 160 * 3:41 * 214 * 160 * 3].reshape(160, 214, 3)
    up = np.asarray(Image.fromarray(frame).resize((428, 320), Image.BICUBIC))
    up = np.pad(up, ((0, (-320) % 16), (0, (-428) % 16), (0, 0)), mode="edge")
    mj = json.load(open(os.path.join(NANO, "model.json")))
    vc = json.load(open(os.path.join(NANO, mj["vae"]["config"])))
    ds = 2 ** (len(vc["block_out_channels"]) - 1)
    noise = torch.randn(1, vc["latent_channels"], up.shape[0] // ds, up.shape[1] // ds,
                        generator=torch.Generator().manual_seed(5))
    save_file({"up_u8": torch.from_numpy(up.copy()), "noise": noise}, f"{work}/frame.frame_in.safetensors")
    cases.append({"name": "frame", "iters": 5, "frame": {"model": os.path.abspath(NANO),
                                                          "inputs": f"{work}/frame.frame_in.safetensors"}})

    json.dump({"out_dir": work, "gemm_n": GEMM_N, "cases": cases}, open(f"{work}/spec.json", "w"), indent=1)
    print(f"{work}/spec.json")


# ----------------------------------------------------------------------------------------------
# torch timing + table


def median_ms(iters, f):
    out = f()  # warm-up
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts), out


def maxdiff(a, b):
    if a is None or b is None:
        return None
    if a.shape != b.shape:
        return float("inf")
    return (a.float() - b.float()).abs().max().item()


def run_torch(work, log):
    """Time the PyTorch side; `RESULT {json}` lines (as the Rust bench) to `log`, outputs to
    <case>.torch.safetensors."""
    threads = int(os.environ.get("DPIR_CMP_THREADS", "2"))
    torch.set_num_threads(threads)
    spec = json.load(open(f"{work}/spec.json"))
    results = []

    from torch.utils.flop_counter import FlopCounterMode

    def report(case, comp, ms, iters, gflop=None):
        results.append({"case": case, "component": comp, "ms": ms, "iters": iters, "gflop": gflop})

    def gflop(f):
        with FlopCounterMode(display=False) as fc:
            f()
        return fc.get_total_flops() / 1e9

    def timed(name, comp, iters, f):
        ms, out = median_ms(iters, f)
        report(name, comp, ms, iters, gflop(f))
        return out

    with torch.no_grad():
        a = torch.randn(GEMM_N, GEMM_N)
        b = torch.randn(GEMM_N, GEMM_N)
        ms, _ = median_ms(5, lambda: a @ b)
        report("machine", "f32 GEMM 2048^3", ms, 5, 2 * GEMM_N ** 3 / 1e9)
        for case in spec["cases"]:
            name, iters = case["name"], case["iters"]
            outputs = {}
            t = case.get("transformer")
            if t:
                m = DpirTorch(t["config"]).load(load_file(t["weights"])).eval()
                io = load_file(t["inputs"])
                args = [io[k] for k in ["hidden_states", "controlnet_cond", "encoder_hidden_states",
                                        "pooled_projections", "timestep"]]
                outputs["transformer_sample"] = timed(name, "transformer forward (incl. control)", iters, lambda: m(*args))
                if case.get("rows") != "forward":
                    c = timed(name, "control_conv alone", iters, lambda: m.control_conv(args[1]))
                    timed(name, "step, control precomputed", iters, lambda: m(*args, control=c))
                del m
            v = case.get("vae")
            if v:
                vae = make_vae(v["config"]).eval()
                vae.load_state_dict(load_file(v["weights"]), strict=True)
                vin = load_file(v["inputs"])
                z, img = vin["latent"], vin["image"]
                outputs["vae_decoded"] = timed(name, "VAE decode", iters, lambda: vae.decode(z).sample)
                outputs["vae_moments"] = timed(name, "VAE encode", iters, lambda: vae.encoder(img))
            fr = case.get("frame")
            if fr:
                import model as M
                mj, tr, fvae, pe = M.load_model(fr["model"])
                fin = load_file(fr["inputs"])
                up = fin["up_u8"].numpy()
                outputs["frame_output"] = timed(name, "whole dpir-nano frame x2", iters,
                                                lambda: M.nano_restore(mj, tr, fvae, pe, up, noise=fin["noise"])[1])
            save_file({k: v.contiguous() for k, v in outputs.items()}, f"{work}/{name}.torch.safetensors")
    with open(log, "w") as f:
        for r in results:
            f.write(f"RESULT {json.dumps(r)}\n")


def read_results(paths):
    """(case, component) -> (list of per-round median ms, shape, GFLOP)."""
    out = {}
    for p in paths:
        for line in open(p):
            if line.startswith("RESULT "):
                r = json.loads(line[len("RESULT "):])
                key = (r["case"], r["component"])
                ms, shape, gf = out.get(key, ([], r.get("shape", ""), r.get("gflop")))
                ms.append(r["ms"])
                out[key] = (ms, shape, gf if gf is not None else r.get("gflop"))
    return out


def table(work, rounds):
    spec = json.load(open(f"{work}/spec.json"))
    rust = read_results([f"{work}/rust.{i}.log" for i in range(rounds)])
    pt = read_results([f"{work}/torch.{i}.log" for i in range(rounds)])
    threads = os.environ.get("DPIR_CMP_THREADS", "2")

    def fmt(x, spec):
        return f"{'-':>{int(spec.split('.')[0])}}" if x is None else format(x, spec)

    def load(p):
        return load_file(p) if os.path.exists(p) else {}

    ratios = []
    print()
    print(f"Rust: candle, cargo profile {os.environ.get('DPIR_CMP_PROFILE', '?')}, RAYON_NUM_THREADS={threads}. "
          f"PyTorch {torch.__version__} / diffusers {__import__('diffusers').__version__}, "
          f"set_num_threads({threads}), no_grad. CPU float32, batch 1.")
    print(f"ms = median over the case's iterations (after 1 warm-up); with {rounds} alternating rounds "
          f"(Rust, PyTorch, Rust, ...) the best round's median per side.")
    peak = {side: r[("machine", "f32 GEMM 2048^3")] for side, r in (("Rust", rust), ("PyTorch", pt))
            if ("machine", "f32 GEMM 2048^3") in r}
    peak_gf = {}
    for side, (ms, _, gf) in peak.items():
        peak_gf[side] = gf / (min(ms) / 1e3)
    best_peak = max(peak_gf.values()) if peak_gf else None
    print("machine f32 matrix-product peak (2048^3 GEMM, same run): " +
          ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak_gf.items()) +
          "; % peak below is of the higher of the two")
    hdr = (f"{'case':<7} {'component':<38} {'shape':<48} {'Rust ms':>9} {'PyTorch ms':>10} "
           f"{'Rust/PT':>8} {'GFLOP':>7} {'R GF/s':>7} {'PT GF/s':>7} {'R %pk':>6} {'max|R-PT|':>9} {'max|PT-fix|':>11}")
    print(hdr)
    print("-" * len(hdr))
    for case in spec["cases"]:
        name = case["name"]
        rout, tout = load(f"{work}/{name}.rust.safetensors"), load(f"{work}/{name}.torch.safetensors")
        exp = load(f"{work}/{name}.expected.safetensors")
        comps = [k[1] for k in rust if k[0] == name] + [k[1] for k in pt if k[0] == name]
        for comp in dict.fromkeys(comps):
            rms, shape, _ = rust.get((name, comp), (None, "", None))
            tms, _, gf = pt.get((name, comp), (None, "", None))
            rms, tms = (min(rms) if rms else None), (min(tms) if tms else None)
            ratio = rms / tms if rms and tms else None
            ratios.append(ratio)
            key = {"transformer forward (incl. control)": "transformer_sample", "VAE decode": "vae_decoded",
                   "VAE encode": "vae_moments", "whole dpir-nano frame x2": "frame_output"}.get(comp)
            d_rt = maxdiff(rout.get(key), tout.get(key)) if key else None
            d_fx = maxdiff(exp.get(key), tout.get(key)) if key else None
            label = comp if key else "  " + comp
            rgf = gf / (rms / 1e3) if gf and rms else None
            tgf = gf / (tms / 1e3) if gf and tms else None
            pk = 100 * rgf / best_peak if rgf and best_peak else None
            print(f"{name:<7} {label:<38} {shape:<48} {fmt(rms, '9.2f')} {fmt(tms, '10.2f')} "
                  f"{fmt(ratio, '8.2f')} {fmt(gf, '7.2f')} {fmt(rgf, '7.1f')} {fmt(tgf, '7.1f')} {fmt(pk, '6.1f')} "
                  f"{fmt(d_rt, '9.1e')} {fmt(d_fx, '11.1e')}")
    good = [r for r in ratios if r]
    if good:
        gm = float(np.exp(np.mean(np.log(good))))
        print(f"geometric mean Rust/PT over {len(good)} rows: {gm:.2f}; worst row {max(good):.2f}")
    print("Rust/PT > 1: Rust slower. max|R-PT|: Rust vs PyTorch output on the same inputs and weights; "
          "max|PT-fix|: PyTorch vs the official-DPIR fixture output (tiny case).")


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "prepare":
        rest = sys.argv[3:]
        real = rest[rest.index("--real") + 1] if "--real" in rest else None
        prepare(sys.argv[2], medium="--no-medium" not in rest, real=real)
    elif cmd == "torch":
        run_torch(sys.argv[2], sys.argv[3])
    elif cmd == "table":
        table(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
