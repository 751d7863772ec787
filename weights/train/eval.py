#!/usr/bin/env python3
"""Evaluate dpir-nano on the validation photos (split by source, never trained on) with fixed-seed x2
degradations: PSNR / SSIM / ST-LPIPS (shift-tolerant LPIPS, AlexNet, offline weights from PyPI
stlpips-pytorch) for
  (a) Lanczos x2 of the degraded LQ,
  (b) classic chains: ffmpeg hqdn3d + Lanczos, ffmpeg nlmeans + Lanczos (ffmpeg from PyPI imageio-ffmpeg),
  (c) dpir-nano through the GStreamer element (--plugin: each LQ frame through pipelines/restore-stills.sh,
      scale=2, model=--model), and the PyTorch implementation of the plugin's sampler as a cross-check (steps /
      shift from model.json, seeded initial noise, z_lq = (posterior mode - shift_factor) * scaling_factor, latent
      tiles of pos_embed_max_size * patch_size as the plugin), colour fix none / wavelet,
plus the autoencoder's own round trip of the HQ photo (its ceiling; not a method).
Loads the EXPORTED f16 files of weights/dpir-nano (upcast to f32), i.e. what the Rust loader reads.
Usage: eval.py [--model weights/dpir-nano] [--scale 2|1] [--mix v1|v2] [--limit N] [--save DIR]
  --mix v1 (default): the shipped model's training mix (the model card's table); v2: degrade.degrade_seeded (real
  codecs through GStreamer, film damage, ...), same fixed seeds. Row "input" is the degraded LQ itself, bicubic-
  upsampled to the output size (at --scale 1: the degraded frame as it is), i.e. what the model is fed.
"""
import argparse, glob, json, os, subprocess, sys, tempfile, types
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from skimage.metrics import structural_similarity

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as M
from degrade import degrade, fixed_rng

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get("DPIR_DATA", os.path.expanduser("~/dpir-data"))
SEED = 2025


def stlpips_model():
    sys.modules.setdefault("IPython", types.SimpleNamespace(embed=None))      # unused imports in the package
    sys.modules.setdefault("torchsummary", types.SimpleNamespace(summary=None))
    from stlpips_pytorch import stlpips
    m = stlpips.LPIPS(net="alex", variant="shift_tolerant", verbose=False)
    return m.eval()


def nano_restore(mj, tr, vae, pe, up_u8, seed=SEED, tile=0, fidelities=()):
    """dpir-nano on one frame already at the output size, as uint8: {no colour fix, wavelet, and when the model has
    a fusion stage: + fusion, and that blended towards the input by each fidelity f (the element's pixel blend)}."""
    out01, wav = M.nano_restore(mj, tr, vae, pe, up_u8, seed=seed, tile=tile, fusion=False)
    to8 = lambda t: (t[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    res = {"nano": to8(out01), "nano+wavelet": to8(wav)}
    fu = getattr(pe, "fusion", None)
    if fu is not None:
        up = torch.from_numpy(up_u8).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():
            fused = fu(up, wav).clamp(0, 1)
        res["nano+wavelet+fusion"] = to8(fused)
        for f in fidelities:
            res[f"fusion, fidelity {f}"] = to8(fused * (1 - f) + up * f)
    return res


@torch.no_grad()
def ae_round_trip(vae, hq_u8):
    x = torch.from_numpy(hq_u8).permute(2, 0, 1)[None].float() / 127.5 - 1
    H, W = x.shape[-2:]
    xp = F.pad(x, (0, (-W) % 16, 0, (-H) % 16), mode="replicate")
    dec = vae.decoder(vae.encoder(xp).chunk(2, dim=1)[0])[..., :H, :W]
    return (((dec[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def run_plugin(plugin_dir, model_dir, lqs, scale=2):
    """(c) through the plugin: each LQ frame as a PNG through `filesrc ! pngdec ! videoconvert ! dpirrestore
    scale=2 model=... ! videoconvert ! pngenc` (pipelines/restore-stills.sh), one gst-launch per frame."""
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "in")); os.makedirs(os.path.join(d, "out"))
        for i, lq in enumerate(lqs):
            Image.fromarray(lq).save(os.path.join(d, "in", f"{i:03d}.png"))
        env = dict(os.environ, GST_PLUGIN_PATH=os.path.abspath(plugin_dir))
        script = os.path.join(HERE, "..", "..", "pipelines", "restore-stills.sh")
        subprocess.run(["bash", script, os.path.join(d, "in"), os.path.join(d, "out"), f"scale={scale}",
                        f"model={os.path.abspath(model_dir)}"], env=env, check=True, stdout=subprocess.DEVNULL)
        return [np.asarray(Image.open(os.path.join(d, "out", f"{i:03d}.png")).convert("RGB")) for i in range(len(lqs))]


def ffmpeg_chain(lq_u8, W, H, filt):
    import imageio_ffmpeg
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    with tempfile.TemporaryDirectory() as td:
        i, o = os.path.join(td, "in.png"), os.path.join(td, "out.png")
        Image.fromarray(lq_u8).save(i)
        subprocess.run([exe, "-loglevel", "error", "-y", "-i", i, "-vf", f"{filt},scale={W}:{H}:flags=lanczos", o], check=True)
        return np.asarray(Image.open(o).convert("RGB"))


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.normpath(os.path.join(HERE, "..", "dpir-nano")))
    ap.add_argument("--val", default=os.path.join(DATA, "clean/val"))
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--save", default="")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plugin", default="", help="folder holding libgstdpir.so: also run the LQ frames through "
                    "the GStreamer element (pipelines/restore-stills.sh, scale=2, model=--model)")
    ap.add_argument("--tile", type=int, default=0, help="latent tile (0: pos_embed_max_size * patch_size, as the plugin)")
    ap.add_argument("--steps", type=int, default=0, help="override model.json default_steps")
    ap.add_argument("--crop", type=int, default=0, help="centre-crop each validation image to at most this side (0: full <=512 crop)")
    ap.add_argument("--scale", type=int, default=2, choices=[1, 2, 4])
    ap.add_argument("--mix", default="v1", choices=["v1", "v2"], help="degradation mix (v1: the card's; v2: degrade_seeded)")
    ap.add_argument("--tag", default="", help="name of this run in the summary file name")
    ap.add_argument("--no-baselines", action="store_true", help="skip the model-independent Lanczos / ffmpeg rows")
    ap.add_argument("--fidelity", default="", help="with a fusion stage: also rows blended towards the input, e.g. 0.25,0.5")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    files = sorted(glob.glob(os.path.join(a.val, "*.png")))
    if a.limit:
        files = files[:a.limit]
    lp = stlpips_model()
    mj, tr, vae, pe = M.load_model(a.model)
    if a.steps:
        mj["sampler"]["default_steps"] = a.steps
    methods = ["input", "lanczos", "hqdn3d+lanczos", "nlmeans+lanczos", "nano", "nano+wavelet", "ae round trip of HQ"]
    fids = [float(x) for x in a.fidelity.split(",") if x]
    if getattr(pe, "fusion", None) is not None:
        methods[6:6] = ["nano+wavelet+fusion"] + [f"fusion, fidelity {f}" for f in fids]
    if a.plugin:
        methods.insert(6, "nano (plugin)")
    if a.no_baselines:
        methods = [m for m in methods if m not in ("lanczos", "hqdn3d+lanczos", "nlmeans+lanczos")]
    res = {m: [] for m in methods}
    pairs = []
    for idx, f in enumerate(files):
        hq = np.asarray(Image.open(f).convert("RGB"))
        if a.crop:
            c = min(a.crop, hq.shape[0], hq.shape[1]) // 16 * 16
            t, l = (hq.shape[0] - c) // 2, (hq.shape[1] - c) // 2
            hq = np.ascontiguousarray(hq[t:t + c, l:l + c])
        pairs.append((hq,) + degrade(hq, fixed_rng(SEED, idx), scale=a.scale, mix=a.mix))
    plugin_out = run_plugin(a.plugin, a.model, [p[1] for p in pairs], a.scale) if a.plugin else None
    for idx, f in enumerate(files):
        hq, lq, up = pairs[idx]
        H, W = hq.shape[:2]
        outs = {"input": up}
        if not a.no_baselines:
            outs.update({"lanczos": np.asarray(Image.fromarray(lq).resize((W, H), Image.LANCZOS)),
                         "hqdn3d+lanczos": ffmpeg_chain(lq, W, H, "hqdn3d=4:3:6:4.5"),
                         "nlmeans+lanczos": ffmpeg_chain(lq, W, H, "nlmeans=s=3:p=7:r=9")})
        outs.update(nano_restore(mj, tr, vae, pe, up, tile=a.tile, fidelities=fids))
        outs["ae round trip of HQ"] = ae_round_trip(vae, hq)
        if plugin_out is not None:
            outs["nano (plugin)"] = plugin_out[idx]  # the autoencoder's ceiling, not a method
        t_hq = torch.from_numpy(hq).permute(2, 0, 1)[None].float() / 127.5 - 1
        for m in methods:
            o = outs[m]
            with torch.no_grad():
                d = lp(torch.from_numpy(o).permute(2, 0, 1)[None].float() / 127.5 - 1, t_hq).item()
            res[m].append((psnr(o, hq), structural_similarity(o, hq, channel_axis=2, data_range=255), d))
        if a.save:
            os.makedirs(a.save, exist_ok=True)
            name = os.path.splitext(os.path.basename(f))[0]
            best = outs.get("nano+wavelet+fusion", outs["nano+wavelet"])
            Image.fromarray(np.concatenate([outs["input"], best, hq], axis=1)).save(
                os.path.join(a.save, f"{name}.png"))
        print(os.path.basename(f), " ".join(f"{m}:{res[m][-1][0]:.2f}/{res[m][-1][2]:.3f}" for m in methods), flush=True)
    print(f"\n{len(files)} validation photos, x{a.scale}, fixed-seed degradations (seed {SEED}, mix {a.mix}), crop {a.crop or 'full'}, model {a.model}")
    print("| method | PSNR (dB) ↑ | SSIM ↑ | ST-LPIPS ↓ |\n|---|---:|---:|---:|")
    summary = {}
    for m in methods:
        r = np.array(res[m])
        summary[m] = r.mean(0).tolist()
        print(f"| {m} | {r[:, 0].mean():.2f} | {r[:, 1].mean():.4f} | {r[:, 2].mean():.4f} |")
    rows = {m: [list(r) for r in res[m]] for m in methods}
    json.dump({"summary": summary, "files": [os.path.basename(f) for f in files], "rows": rows},
              open(os.path.join(DATA, f"logs/eval_{a.tag}x{a.scale}_{a.mix}_c{a.crop}_s{mj['sampler']['default_steps']}.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
