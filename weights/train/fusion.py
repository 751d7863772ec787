#!/usr/bin/env python3
"""dpir-nano's fusion stage (issue #14): a small full-resolution network after the colour fix,
`out = lq + r(lq, restored - lq)` (model.Fusion, src/model/fusion.rs), trained on what the element
feeds it: (LQ frame, dpir-nano's restoration of it, clean frame) triplets from the v2 pool (real
codecs through GStreamer, film damage, x1 / x2 / x4; make_pool_v2.py).

  fusion.py cache  [--model DIR] [--n N]      run the model (PyTorch copy of the element's path: 1 step,
                                              16-latent tiles, wavelet fix, global prompt from the whole
                                              photo, local from the frame) over the first N pool entries:
                                              $DPIR_DATA/pool_v2_restored.npy
  fusion.py train  [--minutes M] [...]        train the fusion net on random crops of the triplets
                                              (Charbonnier, AdamW, cosine; --init: start from a
                                              checkpoint's weights): $DPIR_DATA/ckpt-fusion/fusion.pt
  fusion.py export --model DIR --out DIR      copy DIR's files to OUT, add fusion/{config.json,
                                              model.safetensors} (f16) and the manifest entry + sha256
  fusion.py reference --model DIR             tests/data/fusion_reference.safetensors (Rust parity test)
  fusion.py valcache [--scale 1|2] [--video]  the validation photos as eval.py --mix v2 degrades them (or
                                              eval_video.py's x264 clip) with the frozen model's restoration
                                              before the stage: $DPIR_DATA/val_*_restored.npz
  fusion.py val --ckpt A,B|shipped [--scale S] [--video] [--fidelity F] [-v]
                                              score stage checkpoints on those in seconds (PSNR, SSIM,
                                              ST-LPIPS, photos below the input; for the clip PSNR and temporal
                                              error); eval.py / eval_video.py remain the element's tables

The last layer starts at zero, so the untrained stage returns the input: training can only move it
towards the clean frames from there.
"""
import argparse, hashlib, json, math, os, shutil, sys, time
import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import model as M

DATA = os.environ.get("DPIR_DATA", os.path.expanduser("~/dpir-data"))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))


def _cache_part(args):
    model_dir, lo, hi, pool = args
    torch.set_num_threads(1)
    mj, tr, vae, pe = M.load_model(model_dir)
    lq = np.load(os.path.join(DATA, f"pool_{pool}_lq.npy"), mmap_mode="r")
    gl = np.load(os.path.join(DATA, f"pool_{pool}_glob.npy"), mmap_mode="r")
    out = np.load(os.path.join(DATA, f"pool_{pool}_restored.npy"), mmap_mode="r+")
    t0 = time.time()
    for i in range(lo, hi):
        # The element's path without the fusion stage (what the fusion stage sees), seeded per entry.
        _, wav = M.nano_restore(mj, tr, vae, pe, np.ascontiguousarray(lq[i]), seed=i,
                                global_u8=np.ascontiguousarray(gl[i]), fusion=False)
        out[i] = (wav[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        if (i - lo) % 250 == 0:
            print(f"[{lo}] {i - lo}/{hi - lo} {time.time() - t0:.0f}s", flush=True)
    out.flush()
    return hi - lo


def cache(a):
    n_pool = np.load(os.path.join(DATA, f"pool_{a.pool}_lq.npy"), mmap_mode="r").shape[0]
    n = min(a.n or n_pool, n_pool)
    np.lib.format.open_memmap(os.path.join(DATA, f"pool_{a.pool}_restored.npy"), mode="w+", dtype=np.uint8,
                              shape=(n, 256, 256, 3)).flush()
    b = np.linspace(0, n, a.workers + 1).astype(int)
    jobs = [(a.model, int(b[i]), int(b[i + 1]), a.pool) for i in range(a.workers)]
    t0 = time.time()
    import multiprocessing as mp
    with mp.get_context("fork").Pool(a.workers) as p:
        done = sum(p.map(_cache_part, jobs))
    print(f"{done} restorations in {time.time() - t0:.0f} s")


class Triplets:
    """Random crops of (lq, restored, hq) from the cached entries of one or more pools (uniform over all their
    entries), same flips / rotation on all three, as float [0, 1] NCHW."""

    def __init__(self, crop, seed, pools=("v2",)):
        self.sets = []
        for name in pools:
            re = np.load(os.path.join(DATA, f"pool_{name}_restored.npy"), mmap_mode="r")
            hq = np.load(os.path.join(DATA, f"pool_{name}_hq.npy"), mmap_mode="r")
            lq = np.load(os.path.join(DATA, f"pool_{name}_lq.npy"), mmap_mode="r")
            self.sets += [(lq, re, hq, i) for i in range(re.shape[0])]
        self.n = len(self.sets)
        self.crop = crop
        self.rng = np.random.default_rng(seed)

    def batch(self, b):
        idx = self.rng.integers(0, self.n, b)
        c = self.crop
        out = []
        for j in idx:
            lq, re, hq, i = self.sets[j]
            S = hq.shape[1]
            y, x = (int(v) for v in self.rng.integers(0, S - c + 1, 2))
            t = np.stack([lq[i, y:y + c, x:x + c], re[i, y:y + c, x:x + c], hq[i, y:y + c, x:x + c]])
            k = int(self.rng.integers(4))
            t = np.rot90(t, k, axes=(1, 2))
            if self.rng.random() < 0.5:
                t = t[:, :, ::-1]
            out.append(np.ascontiguousarray(t))
        t = torch.from_numpy(np.stack(out)).permute(1, 0, 4, 2, 3).float() / 255.0  # [3, B, C, H, W]
        return t[0], t[1], t[2]


def stlpips_loss():
    """ST-LPIPS (AlexNet, the stlpips-pytorch weights) as a frozen perceptual loss: the SD autoencoder family is
    trained with LPIPS for the same reason (L1 alone smooths texture away). eval.py reports the same distance, so its
    ST-LPIPS column is not independent of this loss; PSNR and SSIM are."""
    import types
    sys.modules.setdefault("IPython", types.SimpleNamespace(embed=None))
    sys.modules.setdefault("torchsummary", types.SimpleNamespace(summary=None))
    from stlpips_pytorch import stlpips
    m = stlpips.LPIPS(net="alex", variant="shift_tolerant", verbose=False).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def train(a):
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    ck = os.path.join(DATA, "ckpt-fusion")
    os.makedirs(ck, exist_ok=True)
    path = a.ckpt or os.path.join(ck, "fusion.pt")
    net = M.Fusion(a.channels, a.layers, a.downscale)
    net.high_pass = not a.no_high_pass
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=0.0)
    step, spent = 0, 0.0
    if os.path.exists(path) and not a.fresh:
        st = torch.load(path, map_location="cpu", weights_only=False)
        net.load_state_dict(st["net"]); opt.load_state_dict(st["opt"]); step, spent = st["step"], st["spent"]
        print(f"resumed at step {step} ({spent / 60:.1f} min spent)")
    if a.init and os.path.isdir(a.init):  # a model directory: its shipped (f16) fusion stage
        from safetensors.torch import load_file
        st = load_file(os.path.join(a.init, "fusion", "model.safetensors"))
        net.load_state_dict({k: v.float() for k, v in st.items()})
        print(f"weights from {a.init}/fusion")
    elif a.init:
        net.load_state_dict(torch.load(a.init, map_location="cpu", weights_only=False)["net"])
        print(f"weights from {a.init}")
    lp = None
    if a.w_lpips > 0:
        lp = stlpips_loss()
    data = Triplets(a.crop, a.seed + step, a.pools.split(","))
    print(f"fusion: {sum(p.numel() for p in net.parameters())} parameters, {data.n} triplets, crop {a.crop}, batch {a.batch}")
    budget = a.minutes * 60
    t_start = time.time() - spent
    ema = None
    ema_in = None
    ema_db = None
    while time.time() - t_start < budget and not (a.stop_after and step >= a.stop_after):
        frac = (time.time() - t_start) / budget
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.5 * (1 + math.cos(math.pi * frac)) * 0.95 + 0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        lq, re, hq = data.batch(a.batch)
        out = net(lq, re)
        loss = torch.sqrt((out - hq) ** 2 + 1e-6).mean()  # Charbonnier (L1)
        total = loss
        # Per-crop errors of the output and of the input itself (what the MSE-family objectives compare).
        mse_out = ((out - hq) ** 2).mean(dim=(1, 2, 3))
        mse_in = ((lq - hq) ** 2).mean(dim=(1, 2, 3))
        # Hinge, in dB / 10, on every crop made worse than its input. Measured (model card): with it, every base loss
        # (Charbonnier, MSE, log-MSE) ends at the input exactly; kept for reproducing that.
        hinge = lambda: a.w_floor * torch.relu(10 * torch.log10((mse_out + 1e-8) / (mse_in + 1e-8))).mean() / 10
        if a.loss == "mse":  # dominated by the ruined crops: made the pool's 32-38 dB inputs 0.7-1.0 dB worse
            total = mse_out.mean()
        elif a.loss == "relmse":
            # Each crop's MSE relative to its input's (floored at 40 dB): every crop weighs the same, as in the mean
            # per-photo PSNR the validation reports, so harm on nearly clean crops costs as much as a gain on ruined
            # ones. Linear in the crop's MSE: no 1/mse_out blow-up as with the log (--loss psnr).
            total = (mse_out / mse_in.clamp_min(1e-4)).mean()
        elif a.loss == "l1floor":
            total = loss + hinge()
        elif a.loss == "msefloor":
            total = 20 * mse_out.mean() + hinge()
        elif a.loss == "psnr":
            # Mean per-crop PSNR (log MSE): an error on a nearly clean crop costs as much as the same ratio on a
            # ruined one, where L1 mostly sees the ruined ones.
            total = (10 * torch.log10(mse_out + 1e-8)).mean() / 10 + hinge()
        if lp is not None:
            k = a.lpips_crops
            total = loss + a.w_lpips * lp(out[:k] * 2 - 1, hq[:k] * 2 - 1).mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), a.clip)
        opt.step()
        step += 1
        with torch.no_grad():
            base = (lq - hq).abs().mean().item()
            gain = 10 * torch.log10((mse_in + 1e-8) / (mse_out + 1e-8))
            ema_db = gain.mean().item() if ema_db is None else 0.98 * ema_db + 0.02 * gain.mean().item()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        ema_in = base if ema_in is None else 0.98 * ema_in + 0.02 * base
        if step % a.log_every == 0:
            print(f"step {step} {(time.time() - t_start) / 60:.1f} min lr {lr:.2e} loss {ema:.5f} input L1 {ema_in:.5f} "
                  f"({ema / ema_in:.3f} of the input's), PSNR {ema_db:+.3f} dB over the input's", flush=True)
        if step % a.ckpt_every == 0:
            torch.save(dict(net=net.state_dict(), opt=opt.state_dict(), step=step, spent=time.time() - t_start,
                            config=net.config), path + ".tmp")
            os.replace(path + ".tmp", path)
    torch.save(dict(net=net.state_dict(), opt=opt.state_dict(), step=step, spent=time.time() - t_start,
                    config=net.config), path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"done: {step} steps, {(time.time() - t_start) / 60:.1f} min")


def sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def export(a):
    from safetensors.torch import save_file
    st = torch.load(a.ckpt or os.path.join(DATA, "ckpt-fusion", "fusion.pt"), map_location="cpu", weights_only=False)
    if os.path.abspath(a.out) != os.path.abspath(a.model):
        shutil.copytree(a.model, a.out, dirs_exist_ok=True)
    os.makedirs(os.path.join(a.out, "fusion"), exist_ok=True)
    json.dump(st["config"], open(os.path.join(a.out, "fusion", "config.json"), "w"), indent=2)
    save_file({k: v.half().contiguous() for k, v in st["net"].items()},
              os.path.join(a.out, "fusion", "model.safetensors"))
    mj_path = os.path.join(a.out, "model.json")
    mj = json.load(open(mj_path))
    mj["fusion"] = {"config": "fusion/config.json", "weights": ["fusion/model.safetensors"]}
    for rel in ("fusion/config.json", "fusion/model.safetensors"):
        mj["sha256"][rel] = sha(os.path.join(a.out, rel))
    json.dump(mj, open(mj_path, "w"), indent=2)
    open(mj_path, "a").write("\n")
    print(f"exported fusion ({st['step']} steps) into {a.out}")


def reference(a):
    """tests/data/fusion_reference.safetensors: the fusion stage of --model on a fixed input, in PyTorch (f16 weights
    upcast to f32, as the Rust loader does), for tests/model_dir.rs. Inputs: a real photo region (lq: its JPEG-q20
    copy, restored: a blurred copy), 2 x 48 x 80 tall: stripes are tested separately in src/model/fusion.rs."""
    from PIL import Image, ImageFilter
    from safetensors.torch import save_file
    import io
    mj = json.load(open(os.path.join(a.model, "model.json")))
    fu = M.load_fusion(a.model, mj)
    assert fu is not None, f"{a.model} has no fusion stage"
    media = os.path.join(REPO, "..", "shared", "media")
    name = sorted(f for f in os.listdir(media) if f.lower().endswith((".jpg", ".png")))[0]
    im = Image.open(os.path.join(media, name)).convert("RGB")
    im = im.resize((160, im.height * 160 // im.width), Image.BOX).crop((40, 8, 120, 56))
    buf = io.BytesIO(); im.save(buf, "JPEG", quality=20)
    lq = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    restored = im.filter(ImageFilter.GaussianBlur(1.0))
    t = lambda x: torch.from_numpy(np.asarray(x)).permute(2, 0, 1)[None].float().div(255).contiguous()
    with torch.no_grad():
        out = fu(t(lq), t(restored))
    meta = {"source": name, "fusion_sha256": mj["sha256"]["fusion/model.safetensors"]}
    path = os.path.join(REPO, "tests", "data", "fusion_reference.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({"lq": t(lq), "restored": t(restored), "output": out.contiguous()}, path, metadata=meta)
    print(f"wrote {path} ({meta}); mean |out - lq| {float((out - t(lq)).abs().mean()):.4f}")


def _val_path(scale):
    return os.path.join(DATA, f"val_v2_x{scale}_restored.npz")


def valcache(a):
    """The validation photos exactly as eval.py --mix v2 degrades them (same seeds), with the frozen model's
    restoration before the fusion stage (eval.py's "nano+wavelet"), stored once so that fusion checkpoints can be
    scored in seconds (`fusion.py val`). The element agrees with this PyTorch path to 0.02 dB (model card)."""
    if a.video:
        return valcache_video(a)
    import glob
    from PIL import Image
    from degrade import degrade, fixed_rng
    torch.set_num_threads(a.threads)
    files = sorted(glob.glob(os.path.join(DATA, "clean", "val", "*.png")))
    mj, tr, vae, pe = M.load_model(a.model)
    out = {}
    for idx, f in enumerate(files):
        hq = np.asarray(Image.open(f).convert("RGB"))
        _, up = degrade(hq, fixed_rng(2025, idx), scale=a.scale, mix="v2")
        _, wav = M.nano_restore(mj, tr, vae, pe, up, seed=2025, fusion=False)
        name = os.path.basename(f)
        out[f"{name}/hq"], out[f"{name}/up"] = hq, up
        out[f"{name}/wav"] = (wav[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        print(name, flush=True)
    np.savez(_val_path(a.scale), **out)


def _video_path():
    return os.path.join(DATA, "val_video_restored.npz")


def valcache_video(a):
    """eval_video.py's held-out clip (bikes.mp4, first 50 frames, x264 150 kbit/s through GStreamer) with the frozen
    model's restoration before the fusion stage, by eval_video's PyTorch clip policy (noise and global prompt per
    clip, local prompt per frame)."""
    import tempfile
    import eval_video as V
    torch.set_num_threads(a.threads)
    clip = os.path.join(REPO, "..", "shared", "media", "bikes.mp4")
    gt, lq, _ = V.compressed_clip(clip, 50, 150, tempfile.mkdtemp(prefix="dpir-fusion-video-"))
    gt, lq = gt.astype(np.uint8), lq.astype(np.uint8)
    wav = (V.restore_clip(a.model, lq, fusion=False) * 255).round().astype(np.uint8)
    np.savez(_video_path(), gt=gt, lq=lq, wav=wav)
    print(f"{len(gt)} frames {gt.shape[2]}x{gt.shape[1]}")


def _load_stage(a, ck):
    if ck == "shipped":
        return M.load_fusion(a.model, json.load(open(os.path.join(a.model, "model.json"))))
    st = torch.load(ck, map_location="cpu", weights_only=False)
    net = M.Fusion(**st["config"])
    net.load_state_dict(st["net"])
    return net.eval()


def val_video(a):
    """Score fusion checkpoints on valcache --video's clip: PSNR over the clip, worst frame, temporal error (and its
    ratio to the compressed input's), as eval_video.py."""
    z = np.load(_video_path())
    gt, lq, wav = z["gt"].astype(np.float64), z["lq"], z["wav"]
    dgt = np.diff(gt, axis=0)

    def row(x):
        per = ((x - gt) ** 2).mean(axis=(1, 2, 3))
        return 10 * np.log10(255 ** 2 / per.mean()), 10 * np.log10(255 ** 2 / per.max()), np.abs(np.diff(x, axis=0) - dgt).mean()

    p, worst, te0 = row(lq.astype(np.float64))
    print(f"compressed input: {p:.2f} dB, worst frame {worst:.2f}, temporal error {te0:.3f}")
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float() / 255.0
    h, w = lq.shape[1:3]
    for ck in a.ckpt.split(","):
        net = _load_stage(a, ck)
        outs = []
        with torch.no_grad():
            for i in range(len(lq)):
                pad = lambda x: np.pad(x, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
                o = net(t(pad(lq[i])), t(pad(wav[i]))).clamp(0, 1)[0, :, :h, :w]
                outs.append(o.permute(1, 2, 0).numpy())
        o = np.stack(outs) * (1 - a.fidelity) + lq / 255.0 * a.fidelity
        p, worst, te = row(np.round(np.clip(o, 0, 1) * 255))
        print(f"{ck} fidelity {a.fidelity}: {p:.2f} dB, worst frame {worst:.2f}, temporal error {te:.3f} ({te / te0:.3f}x)")


def val(a):
    """Score fusion checkpoints (--ckpt, comma-separated; `shipped` = --model's fusion files) on valcache's photos:
    mean PSNR / SSIM / ST-LPIPS at --fidelity (the element's blend), photos below the input by > 0.2 dB, and
    per-photo PSNR over the input with -v."""
    if a.video:
        return val_video(a)
    from skimage.metrics import structural_similarity
    import eval as E
    torch.set_num_threads(a.threads)
    z = np.load(_val_path(a.scale))
    names = sorted({k.split("/")[0] for k in z.files})
    lp = E.stlpips_model()
    t = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255.0
    for ck in a.ckpt.split(","):
        net = _load_stage(a, ck)
        rows = []
        for n in names:
            hq, up, wav = z[f"{n}/hq"], z[f"{n}/up"], z[f"{n}/wav"]
            if E.psnr(up, hq) > 60:  # an identity degradation (eval's lxqt__flowers at x1): reported apart
                continue
            with torch.no_grad():
                o = net(t(up), t(wav)).clamp(0, 1)
                o = o * (1 - a.fidelity) + t(up) * a.fidelity
                o8 = (o[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                d = lp(t(o8) * 2 - 1, t(hq) * 2 - 1).item()
            rows.append((n, E.psnr(up, hq), E.psnr(o8, hq), structural_similarity(o8, hq, channel_axis=2, data_range=255), d))
        r = np.array([x[1:] for x in rows])
        below = [(x[0], round(x[2] - x[1], 2)) for x in rows if x[2] < x[1] - 0.2]
        print(f"{ck} x{a.scale} fidelity {a.fidelity}: {len(rows)} photos, input {r[:, 0].mean():.2f} dB, "
              f"out {r[:, 1].mean():.2f} dB ({r[:, 1].mean() - r[:, 0].mean():+.2f}), SSIM {r[:, 2].mean():.4f}, "
              f"ST-LPIPS {r[:, 3].mean():.4f}, below the input by > 0.2 dB: {below}", flush=True)
        if a.verbose:
            for x in rows:
                print(f"  {x[0][:40]:40s} {x[1]:6.2f} {x[2] - x[1]:+6.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["cache", "train", "export", "reference", "valcache", "val"])
    ap.add_argument("--model", default=os.path.join(REPO, "weights", "dpir-nano"))
    ap.add_argument("--out", default=os.path.join(DATA, "export-fusion"))
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=45)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--channels", type=int, default=48)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--downscale", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--no-high-pass", action="store_true",
                    help="train without the low-band removal (the shipped stage's first phase); inference always has it")
    ap.add_argument("--init", default="", help="train: start from this checkpoint's weights (fresh optimiser and schedule)")
    ap.add_argument("--w-lpips", type=float, default=0.0,
                    help="train: weight of an ST-LPIPS term (0.1 was tried: PSNR and ST-LPIPS both below the input's "
                         "after 400 steps; the shipped stage is Charbonnier only)")
    ap.add_argument("--lpips-crops", type=int, default=8, help="train: crops of each batch the ST-LPIPS term sees")
    ap.add_argument("--pool", default="v2", help="cache: the pool (pool_NAME_*.npy, make_pool_v2.py --name)")
    ap.add_argument("--pools", default="v2", help="train: the cached pools to draw crops from, comma-separated")
    ap.add_argument("--loss", choices=["l1", "mse", "relmse", "l1floor", "msefloor", "psnr"], default="l1",
                    help="train: Charbonnier (v2's stage), plain MSE and relative MSE (v2.1's phases), or with a hinge on "
                         "crops made worse than their input (--w-floor): Charbonnier / MSE / mean per-crop -PSNR plus "
                         "hinge (measured: all three end at the input exactly; model card)")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="train: stop at this step, the schedule still spanning --minutes (how the v2.1 stage's first "
                         "two phases ended)")
    ap.add_argument("--clip", type=float, default=0.0, help="train: clip the gradient norm to this (0: off)")
    ap.add_argument("--w-floor", type=float, default=1.0, help="train, --loss psnr / l1floor / msefloor: weight of the hinge")
    ap.add_argument("--scale", type=int, default=1, choices=[1, 2], help="valcache / val: the validation scale")
    ap.add_argument("--fidelity", type=float, default=0.0, help="val: blend towards the input, as the element")
    ap.add_argument("--video", action="store_true", help="valcache / val: eval_video.py's held-out clip instead of the photos")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--ckpt-every", type=int, default=200)
    a = ap.parse_args()
    {"cache": cache, "train": train, "export": export, "reference": reference, "valcache": valcache,
     "val": val}[a.stage](a)


if __name__ == "__main__":
    main()
