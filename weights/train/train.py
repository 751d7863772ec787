#!/usr/bin/env python3
"""Train dpir-nano: stage `ae` (AutoencoderKL distilled from TAESD3 + reconstruction), then stage `dit`
(DPIR transformer + both vision towers, rectified-flow velocity loss conditioned on z_lq).

Resumable: checkpoints under $DPIR_CKPT (default $DPIR_DATA/ckpt)/{ae,dit,dec}.pt (written every --ckpt-every steps and at the end).
Runs for --minutes of wall time or --steps steps, whichever comes first.
"""
import argparse, json, math, os, sys, time
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as M
from degrade import degrade

DATA = os.environ.get("DPIR_DATA", os.path.expanduser("~/dpir-data"))
# checkpoints: $DPIR_CKPT, else $DPIR_DATA/ckpt (a fine-tune keeps its own directory, e.g. $DPIR_DATA/ckpt-v2)
CKPT = os.environ.get("DPIR_CKPT", os.path.join(DATA, "ckpt"))
REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
# shared weights (TAESD3 teacher): $DPIR_WEIGHTS, else ../shared/weights next to the repository
WEIGHTS = os.environ.get("DPIR_WEIGHTS", os.path.normpath(os.path.join(REPO, "..", "shared", "weights")))


# ------------------------------------------------------------------ TAESD3 teacher (madebyollin/taesd Encoder)
def _conv(i, o, **k):
    return nn.Conv2d(i, o, 3, padding=1, **k)

class _Block(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.conv = nn.Sequential(_conv(i, o), nn.ReLU(), _conv(o, o), nn.ReLU(), _conv(o, o))
        self.skip = nn.Conv2d(i, o, 1, bias=False) if i != o else nn.Identity()
        self.fuse = nn.ReLU()
    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))

def taesd_encoder(path=None, lc=16):
    path = path or os.path.join(WEIGHTS, "taesd3", "taesd3_encoder.safetensors")
    enc = nn.Sequential(_conv(3, 64), _Block(64, 64),
                        _conv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64),
                        _conv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64),
                        _conv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64),
                        _conv(64, lc))
    sd = {k: v.float() for k, v in load_file(path).items()}
    enc.load_state_dict(sd)
    return enc.eval().requires_grad_(False)


# ------------------------------------------------------------------ data
_POOL = {}

def load_pool(size=128):
    """The crop pool: `pool_train_<S>.npy` (memory-mapped), or `pool_train_<S>.jpgpack` (the same crops as JPEG
    q90 4:4:4, made by `pack_pool.py` so the pool fits the 64 MiB a GPU machine is sent), decoded once."""
    npy = os.path.join(DATA, f"pool_train_{size}.npy")
    if os.path.exists(npy):
        return np.load(npy, mmap_mode="r")
    if size not in _POOL:
        import io
        from PIL import Image
        pack = os.path.join(DATA, f"pool_train_{size}.jpgpack")
        offs = np.load(pack + ".offsets.npy")
        raw = open(pack, "rb").read()
        _POOL[size] = np.stack([np.asarray(Image.open(io.BytesIO(raw[offs[i]:offs[i + 1]])).convert("RGB"))
                                for i in range(len(offs) - 1)])
    return _POOL[size]

def augment(a, rng):
    k = int(rng.integers(4))
    a = np.rot90(a, k)
    if rng.random() < 0.5:
        a = a[:, ::-1]
    return np.ascontiguousarray(a)

class PairDataset(torch.utils.data.IterableDataset):
    """Endless (hq, lq_up) pairs: random pool crop, random dihedral flip, random degradation (x2 mostly, x1 too)."""
    def __init__(self, pool_size=128, crop=128, p_x1=0.2, seed=1):
        self.pool_size, self.crop, self.p_x1, self.seed = pool_size, crop, p_x1, seed
    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, int(time.time()), info.id if info else 0])
        pool = load_pool(self.pool_size)
        S = self.crop
        while True:
            a = pool[int(rng.integers(len(pool)))]
            if S < a.shape[0]:
                y, x = rng.integers(0, a.shape[0] - S + 1, 2)
                a = a[y:y + S, x:x + S]
            hq = augment(np.asarray(a), rng)
            scale = 1 if rng.random() < self.p_x1 else 2
            _, up = degrade(hq, rng, scale=scale)
            yield torch.from_numpy(hq).permute(2, 0, 1), torch.from_numpy(np.ascontiguousarray(up)).permute(2, 0, 1)


_POOL2 = {}

def load_pool_v2():
    """make_pool_v2.py's pool (memory-mapped): hq / lq frames 256, the whole photo's degraded CLIP view 224, meta."""
    if not _POOL2:
        for k in ("hq", "lq", "glob", "meta"):
            _POOL2[k] = np.load(os.path.join(DATA, f"pool_v2_{k}.npy"), mmap_mode="r")
    return _POOL2


def _clip_view(u8):
    """CLIPImageProcessor's geometry on 8-bit RGB (PIL bicubic, shortest side 224, centre crop 224), as the plugin."""
    from PIL import Image
    h, w = u8.shape[:2]
    if min(h, w) != 224:
        nh, nw = (224, max(224, int(224 * w / h))) if h <= w else (max(224, int(224 * h / w)), 224)
        u8 = np.asarray(Image.fromarray(np.ascontiguousarray(u8)).resize((nw, nh), Image.BICUBIC))
    h, w = u8.shape[:2]
    t, l = (h - 224) // 2, (w - 224) // 2
    return np.ascontiguousarray(u8[t:t + 224, l:l + 224])


class PoolV2Dataset(torch.utils.data.IterableDataset):
    """Endless (hq crop, lq_up crop, local prompt image, global prompt image) from make_pool_v2.py's pool:
    DPIR's global-local visual training as the element feeds it. The crop (crop x crop of a 256 frame) is the tile
    being restored; local prompt = the degraded FRAME (src/engine/dpir.rs: local per frame) with p_local_frame, else
    the crop itself; global = the degraded whole photo the frame comes from (the clip's key frame / the image),
    or with p_global_self the frame itself (a still image, where the element's local and global views coincide).
    Prompt images are returned as their 224x224 CLIP views (uint8)."""
    def __init__(self, crop=128, seed=1, p_local_frame=0.6, p_global_self=0.25):
        self.crop, self.seed, self.plf, self.pgs = crop, seed, p_local_frame, p_global_self
    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, int(time.time()), info.id if info else 0])
        P = load_pool_v2()
        F = P["hq"].shape[1]
        S = self.crop
        n = 0
        while True:
            if n % 512 == 0:  # entries already written (make_pool_v2.py may still be filling the pool)
                valid = np.flatnonzero(np.asarray(P["meta"][:, 0]) > 0)
            n += 1
            i = int(valid[int(rng.integers(len(valid)))])
            y, x = (int(v) for v in rng.integers(0, F - S + 1, 2))
            hq = np.asarray(P["hq"][i, y:y + S, x:x + S])
            lqf = np.asarray(P["lq"][i])
            lq = lqf[y:y + S, x:x + S]
            loc = _clip_view(lqf if rng.random() < self.plf else lq)
            glo = _clip_view(lqf) if rng.random() < self.pgs else np.asarray(P["glob"][i])
            t = lambda a: torch.from_numpy(np.array(a)).permute(2, 0, 1)
            yield t(hq), t(lq), t(loc), t(glo)


def init_from_export(a):
    """Inverse of export.py: the exported f16 files of a model directory (model.json, diffusers/HF names) ->
    $DPIR_CKPT/{ae.pt, ae_norm.json, dit.pt} (weights only, step 0), so `dit` / `dec` fine-tune from them and
    export.py re-exports. The autoencoder's latent normalisation comes from its vae/config.json."""
    mj, tr, vae, pe = M.load_model(a.init_from)
    os.makedirs(CKPT, exist_ok=True)
    for p in ("ae.pt", "ae_norm.json", "dit.pt", "dec.pt"):
        if os.path.exists(os.path.join(CKPT, p)) and not a.force:
            sys.exit(f"{CKPT}/{p} exists (use --force to overwrite)")
    sd = dict(tr.state_dict())
    fresh = M.make_transformer()  # the training-size positional table (all zeros, as the export's)
    assert sd["pos_embed.pos_embed"].abs().max() == 0
    sd["pos_embed.pos_embed"] = torch.zeros_like(fresh.pos_embed.pos_embed)
    fresh.load_state_dict(sd)
    torch.save({"vae": vae.state_dict(), "step": 0, "spent": 0.0, "from": a.init_from}, os.path.join(CKPT, "ae.pt"))
    json.dump({"shift_factor": vae.config.shift_factor, "scaling_factor": vae.config.scaling_factor,
               "from": a.init_from}, open(os.path.join(CKPT, "ae_norm.json"), "w"))
    torch.save({"tr": fresh.state_dict(), "pe": pe.state_dict(), "dec": vae.decoder.state_dict(), "step": 0, "spent": 0.0,
                "from": a.init_from}, os.path.join(CKPT, "dit.pt"))
    if os.path.exists(os.path.join(CKPT, "dec.pt")):
        os.remove(os.path.join(CKPT, "dec.pt"))
    print("initialised", CKPT, "from", a.init_from, json.dumps(mj["sampler"]))


def to_pm1(u8):
    return u8.float() / 127.5 - 1.0


# ------------------------------------------------------------------ checkpoints
EXPORT_DIR = None  # --export-dir: also write weights-only copies there (what a GPU machine sends back)

def save_ckpt(path, **objs):
    tmp = path + ".tmp"
    torch.save(objs, tmp)
    os.replace(tmp, path)
    if EXPORT_DIR:
        slim = {k: ({n: t.detach().half().cpu() for n, t in v.items()} if k in ("vae", "tr", "pe", "dec") else v)
                for k, v in objs.items() if not k.endswith("opt")}
        dst = os.path.join(EXPORT_DIR, os.path.basename(path))
        torch.save(slim, dst + ".tmp")
        os.replace(dst + ".tmp", dst)

def log(f, **kv):
    s = json.dumps(kv)
    print(s, flush=True)
    f.write(s + "\n"); f.flush()


# ------------------------------------------------------------------ stage AE
def train_ae(a):
    os.makedirs(CKPT, exist_ok=True)
    path = os.path.join(CKPT, "ae.pt")
    dev = torch.device(a.device)
    vae = M.make_vae().to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, weight_decay=0.0)
    step, spent = 0, 0.0
    if os.path.exists(path):
        ck = torch.load(path, weights_only=False, map_location=dev)
        vae.load_state_dict(ck["vae"]); opt.load_state_dict(ck["opt"]); step, spent = ck["step"], ck["spent"]
        print("resumed ae at", step)
    teacher = taesd_encoder().to(dev) if a.w_lat > 0 else None
    pool = load_pool(128)
    # on a GPU the whole pool sits on the device as uint8 and batches are cut there (no loader needed)
    pool_dev = torch.from_numpy(np.ascontiguousarray(pool)).to(dev) if dev.type == "cuda" else None
    rng = np.random.default_rng(1234 + step)
    lf = open(os.path.join(DATA, "logs/ae.jsonl"), "a")
    t0 = time.time() - spent
    vae.train()
    while step < a.steps and (time.time() - t0) < a.minutes * 60:
        S = a.crop
        idx = rng.integers(0, len(pool), a.batch)
        if pool_dev is not None:
            y, x = (int(v) for v in rng.integers(0, 128 - S + 1, 2))
            u8 = pool_dev[torch.from_numpy(idx).to(dev), y:y + S, x:x + S].permute(0, 3, 1, 2)
            u8 = torch.rot90(u8, int(rng.integers(4)), dims=(2, 3))
            if rng.random() < 0.5:
                u8 = u8.flip(3)
        else:
            b = []
            for i in idx:
                y, x = rng.integers(0, 128 - S + 1, 2)
                b.append(augment(np.asarray(pool[i][y:y + S, x:x + S]), rng))
            u8 = torch.from_numpy(np.stack(b)).permute(0, 3, 1, 2)
        x01 = u8.float() / 255.0
        frac = (time.time() - t0) / (a.minutes * 60)
        lr = M.cosine_lr(a.lr, frac, (step + 1) / 50)
        M.set_lr(opt, lr)
        mom = vae.encoder(x01 * 2 - 1)
        mean, logvar = mom.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        std = torch.exp(0.5 * logvar)
        # deterministic AE (the plugin and DPIR's denoise_vae_use_mode use the posterior mode); the decoder sees
        # mean + small noise for robustness; logvar is pulled to -12 (std 0.0025) so a posterior sample ~ mode
        z = mean + a.latent_noise * mean.detach().std() * torch.randn_like(mean)
        rec = vae.decoder(z)
        l_rec = (rec - (x01 * 2 - 1)).abs().mean()
        if a.w_color:  # chroma + low-frequency emphasis (a tiny AE learns luminance first and drops colour)
            d = rec - (x01 * 2 - 1)
            chroma = d - d.mean(dim=1, keepdim=True)
            l_rec = l_rec + a.w_color * (chroma.abs().mean() + F.avg_pool2d(d, 4).abs().mean())
        l_kl = ((logvar + 12.0) ** 2).mean() + (mean.mean() ** 2)   # logvar target + keep latents centred
        loss = l_rec + a.w_kl * l_kl
        l_lat = torch.zeros(())
        if teacher is not None:  # optional TAESD3 distillation (off by default: too slow on 2 shared CPU cores)
            with torch.no_grad():
                zt = teacher(x01)
            l_lat = F.mse_loss((mean - M.VAE["shift_factor"]) * M.VAE["scaling_factor"], zt)
            loss = loss + a.w_lat * l_lat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % a.log_every == 0:
            mse = F.mse_loss(rec.detach().clamp(-1, 1), x01 * 2 - 1).item() / 4
            log(lf, stage="ae", step=step, t=round(time.time() - t0), loss=round(loss.item(), 4), rec=round(l_rec.item(), 4),
                kl=round(l_kl.item(), 4), lat=round(l_lat.item(), 4), psnr=round(10 * math.log10(1 / max(mse, 1e-10)), 2),
                mstd=round(mean.std().item(), 3), sstd=round(std.mean().item(), 4), lr=lr)
        if step % a.ckpt_every == 0:
            save_ckpt(path, vae=vae.state_dict(), opt=opt.state_dict(), step=step, spent=time.time() - t0)
    save_ckpt(path, vae=vae.state_dict(), opt=opt.state_dict(), step=step, spent=time.time() - t0)
    print("ae done", step)


# ------------------------------------------------------------------ stage DiT
SCHED_SIGMAS = None

def draw_sigma(n, steps, shift, rng, p1=0.0):
    """p1: probability of sigma = 1 exactly (the shipped 1-step sampler's only sigma), else as before: half the
    exact `steps`-step SD3 grid, half shifted-uniform."""
    grid = M.sd3_sigmas(steps, shift)[:-1]
    out = []
    for _ in range(n):
        if rng.random() < p1:
            out.append(1.0)
        elif rng.random() < 0.5:
            out.append(float(grid[int(rng.integers(len(grid)))]))
        else:
            u = rng.random()
            out.append(shift * u / (1 + (shift - 1) * u))
    return torch.tensor(out, dtype=torch.float32)


def load_vae_frozen(dev="cpu"):
    """The trained AE with its latent normalisation (shift_factor, scaling_factor) measured on the training
    pool (posterior means of 256 random 128x128 crops) and stored in ckpt/ae_norm.json; M.VAE is updated."""
    vae = M.make_vae()
    ck = torch.load(os.path.join(CKPT, "ae.pt"), weights_only=False, map_location="cpu")
    vae.load_state_dict(ck["vae"])
    vae = vae.to(dev).eval().requires_grad_(False)
    npath = os.path.join(CKPT, "ae_norm.json")
    if not os.path.exists(npath):
        pool = load_pool(128)
        rng = np.random.default_rng(5)
        ms = []
        with torch.no_grad():
            for i in range(0, 256, 32):
                u8 = torch.from_numpy(np.stack([np.asarray(pool[j]) for j in rng.integers(0, len(pool), 32)])).permute(0, 3, 1, 2)
                ms.append(vae.encoder(to_pm1(u8.to(dev))).chunk(2, dim=1)[0])
        m = torch.cat(ms)
        norm = {"shift_factor": round(m.mean().item(), 4), "scaling_factor": round(1.0 / m.std().item(), 4),
                "ae_steps": ck["step"], "ae_seconds": round(ck["spent"])}
        json.dump(norm, open(npath, "w"))
        if EXPORT_DIR:
            json.dump(norm, open(os.path.join(EXPORT_DIR, "ae_norm.json"), "w"))
    norm = json.load(open(npath))
    M.VAE["shift_factor"] = norm["shift_factor"]; M.VAE["scaling_factor"] = norm["scaling_factor"]
    vae.register_to_config(shift_factor=norm["shift_factor"], scaling_factor=norm["scaling_factor"])
    print("vae norm", norm)
    return vae


@torch.no_grad()
def encode_mode(vae, img_pm1):
    mean = vae.encoder(img_pm1).chunk(2, dim=1)[0]
    return (mean - M.VAE["shift_factor"]) * M.VAE["scaling_factor"]


def train_dit(a):
    path = os.path.join(CKPT, "dit.pt")
    dev = torch.device(a.device)
    vae = load_vae_frozen(dev)
    tr = M.make_transformer().to(dev)
    pe = M.PromptEncoder().to(dev)
    params = list(tr.parameters()) + list(pe.parameters())
    groups = [{"params": params, "base_lr": a.lr}]
    if a.w_pix and a.train_dec:  # end-to-end pixel loss also trains the decoder (own learning rate)
        groups.append({"params": list(vae.decoder.parameters()), "base_lr": a.dec_lr})
    opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.99))
    # The AE decoder keeps training (every --dec-every steps) while the DiT trains: the encoder, hence the
    # latent space the DiT learns, stays frozen.
    dec_params = list(vae.decoder.parameters())
    dec_opt = torch.optim.AdamW(dec_params, lr=a.dec_lr)
    step, spent = 0, 0.0
    if os.path.exists(path):
        ck = torch.load(path, weights_only=False, map_location=dev)
        tr.load_state_dict(ck["tr"]); pe.load_state_dict(ck["pe"])
        if "dec" in ck:
            vae.decoder.load_state_dict(ck["dec"])
        # a weights-only checkpoint (what a GPU machine sends back) has no optimiser state: warm up again
        if "opt" in ck:
            opt.load_state_dict(ck["opt"])
            if "dec_opt" in ck:
                dec_opt.load_state_dict(ck["dec_opt"])
        step, spent = ck["step"], ck["spent"]
        print("resumed dit at", step, "" if "opt" in ck else "(weights only: fresh optimiser, re-warm-up)")
    step0 = 0 if (not os.path.exists(path) or "opt" in ck) else step
    sf, sh = M.VAE["scaling_factor"], M.VAE["shift_factor"]
    dec_loss = float("nan")
    tr.pos_embed.pos_embed.zero_()
    ds = PairDataset(crop=a.crop, seed=step + 7, p_x1=a.p_x1) if a.pool == "v1" else PoolV2Dataset(crop=a.crop, seed=step + 7)
    dl = iter(torch.utils.data.DataLoader(ds, batch_size=a.batch, num_workers=a.workers, pin_memory=dev.type == "cuda",
                                          persistent_workers=a.workers > 0, prefetch_factor=4 if a.workers else None))
    rng = np.random.default_rng(99 + step)
    lf = open(os.path.join(DATA, "logs/dit.jsonl"), "a")
    t0 = time.time() - spent
    tr.train(); pe.train()
    ema = None
    pix_loss = float("nan")
    all_params = [p for g in opt.param_groups for p in g["params"]]
    if a.w_pix and a.train_dec:
        vae.decoder.train().requires_grad_(True)
    while step < a.steps and (time.time() - t0) < a.minutes * 60:
        b = next(dl)
        hq, up = b[0].to(dev, non_blocking=True), b[1].to(dev, non_blocking=True)
        hq_pm1, up_pm1 = to_pm1(hq), to_pm1(up)
        z0 = encode_mode(vae, hq_pm1)
        zl = encode_mode(vae, up_pm1)
        if len(b) == 4:  # v2 pool: local prompt (frame or crop) and global prompt (the whole photo), as CLIP views
            ctx, pooled = pe(b[2].to(dev).float() / 255.0, b[3].to(dev).float() / 255.0)
        else:
            ctx, pooled = pe(up.float() / 255.0)
        sig = draw_sigma(z0.shape[0], a.sample_steps, a.shift, rng, a.p_sigma1).to(dev)
        eps = torch.randn_like(z0)
        s4 = sig.view(-1, 1, 1, 1)
        xs = (1 - s4) * z0 + s4 * eps
        v = tr.dpir_forward(xs, zl, ctx, pooled, sig * 1000.0)
        loss = F.mse_loss(v, eps - z0)
        sel = sig > 0.999
        if a.w_pix and sel.any():
            # what the plugin outputs at 1 step: x0 = x_1 - v, decoded, wavelet colour fix against the LQ; L1 + 4 MSE
            x0 = (xs - s4 * v)[sel]
            dec = vae.decoder(x0 / sf + sh)
            out01 = M.wavelet_color_fix(((dec + 1) / 2).clamp(0, 1), up[sel].float() / 255.0)
            d = out01 - hq[sel].float() / 255.0
            lp = d.abs().mean() + 4.0 * (d ** 2).mean()
            loss = loss + a.w_pix * lp
            pix_loss = lp.item()
        frac = (time.time() - t0) / (a.minutes * 60)
        warm = (step - step0 + 1) / a.warmup
        for g in opt.param_groups:
            g["lr"] = M.cosine_lr(g.get("base_lr", a.lr), frac, warm)
        lr = opt.param_groups[0]["lr"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(all_params, 1.0)
        opt.step()
        with torch.no_grad():
            tr.pos_embed.pos_embed.zero_()
        if a.dec_every and step % a.dec_every == 0:
            vae.decoder.requires_grad_(True)
            zin = z0 / sf + sh
            zin = zin + 0.05 * zin.std() * torch.randn_like(zin)
            d = vae.decoder(zin) - hq_pm1
            l_dec = d.abs().mean() + (d - d.mean(dim=1, keepdim=True)).abs().mean() + F.avg_pool2d(d, 4).abs().mean()
            M.set_lr(dec_opt, M.cosine_lr(a.dec_lr, frac))
            dec_opt.zero_grad(set_to_none=True)
            l_dec.backward()
            torch.nn.utils.clip_grad_norm_(dec_params, 1.0)
            dec_opt.step()
            vae.decoder.requires_grad_(False)
            dec_loss = l_dec.item()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % a.log_every == 0:
            with torch.no_grad():
                x0p = xs - s4 * v
                x0_err = F.mse_loss(x0p[sig > 0.99], z0[sig > 0.99]).item() if (sig > 0.99).any() else float("nan")
            log(lf, stage="dit", step=step, t=round(time.time() - t0), loss=round(loss.item(), 4), ema=round(ema, 4),
                x0_err_at_1=round(x0_err, 4), dec_l1=round(dec_loss, 4), pix=round(pix_loss, 4), lr=lr)
        if step % a.ckpt_every == 0:
            save_ckpt(path, tr=tr.state_dict(), pe=pe.state_dict(), opt=opt.state_dict(), dec=vae.decoder.state_dict(),
                      dec_opt=dec_opt.state_dict(), step=step, spent=time.time() - t0)
    save_ckpt(path, tr=tr.state_dict(), pe=pe.state_dict(), opt=opt.state_dict(), dec=vae.decoder.state_dict(),
                      dec_opt=dec_opt.state_dict(), step=step, spent=time.time() - t0)
    print("dit done", step)


# ------------------------------------------------------------------ stage dec (decoder on the sampler's outputs)
def train_dec(a):
    """Fine-tune the AE decoder on what the plugin decodes: latents sampled by the frozen DiT (a.sample_steps
    Euler steps, shift a.shift) from z_lq of degraded crops, against the HQ crop after the shipped colour fix
    (--color-fix wavelet|none). The DiT, its velocity training and the encoder (latent space) are untouched."""
    path = os.path.join(CKPT, "dec.pt")
    dev = torch.device(a.device)
    vae = load_vae_frozen(dev)
    ck = torch.load(os.path.join(CKPT, "dit.pt"), weights_only=False, map_location=dev)
    tr = M.make_transformer().to(dev); tr.load_state_dict(ck["tr"]); tr.eval().requires_grad_(False)
    pe = M.PromptEncoder().to(dev); pe.load_state_dict(ck["pe"]); pe.eval().requires_grad_(False)
    if "dec" in ck:
        vae.decoder.load_state_dict(ck["dec"])
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=a.lr, weight_decay=0.0)
    step, spent = 0, 0.0
    if os.path.exists(path):
        dk = torch.load(path, weights_only=False, map_location=dev)
        vae.decoder.load_state_dict(dk["dec"]); step, spent = dk["step"], dk["spent"]
        if "opt" in dk:
            opt.load_state_dict(dk["opt"])
        print("resumed dec at", step)
    step0 = step
    vae.decoder.train().requires_grad_(True)
    sf, sh = M.VAE["scaling_factor"], M.VAE["shift_factor"]
    ds = PairDataset(crop=a.crop, seed=step + 11, p_x1=a.p_x1) if a.pool == "v1" else PoolV2Dataset(crop=a.crop, seed=step + 11)
    dl = iter(torch.utils.data.DataLoader(ds, batch_size=a.batch, num_workers=a.workers))
    lf = open(os.path.join(DATA, "logs/dec.jsonl"), "a")
    t0 = time.time() - spent
    while step < a.steps and (time.time() - t0) < a.minutes * 60:
        b = next(dl)
        hq, up = b[0].to(dev), b[1].to(dev)
        with torch.no_grad():
            zl = encode_mode(vae, to_pm1(up))
            if len(b) == 4:
                ctx, pooled = pe(b[2].to(dev).float() / 255.0, b[3].to(dev).float() / 255.0)
            else:
                ctx, pooled = pe(up.float() / 255.0)
            z = M.sample(tr, zl, ctx, pooled, torch.randn_like(zl), a.sample_steps, a.shift)
        out01 = (vae.decoder(z / sf + sh) + 1) / 2
        if a.color_fix == "wavelet":
            out01 = M.wavelet_color_fix(out01, up.float() / 255.0)
        d = out01 - hq.float() / 255.0
        loss = d.abs().mean() + (d ** 2).mean() * 4.0
        frac = (time.time() - t0) / (a.minutes * 60)
        lr = M.cosine_lr(a.lr, frac, (step - step0 + 1) / 50)
        M.set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.decoder.parameters(), 1.0)
        opt.step()
        step += 1
        if step % a.log_every == 0:
            mse = (d.detach().clamp(-1, 1) ** 2).mean().item()
            log(lf, stage="dec", step=step, t=round(time.time() - t0), loss=round(loss.item(), 4),
                psnr=round(10 * math.log10(1 / max(mse, 1e-10)), 2), lr=lr)
        if step % a.ckpt_every == 0:
            save_ckpt(path, dec=vae.decoder.state_dict(), opt=opt.state_dict(), step=step, spent=time.time() - t0)
    save_ckpt(path, dec=vae.decoder.state_dict(), opt=opt.state_dict(), step=step, spent=time.time() - t0)
    print("dec done", step)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["ae", "dit", "dec", "init"])
    ap.add_argument("--init-from", default=os.path.join(REPO, "weights", "dpir-nano"),
                    help="stage init: exported model directory to start a fine-tune from (into $DPIR_CKPT)")
    ap.add_argument("--force", action="store_true", help="stage init: overwrite existing checkpoints")
    ap.add_argument("--pool", default="v1", choices=["v1", "v2"],
                    help="v1: pool_train_128 + on-the-fly degrade_v1; v2: make_pool_v2.py's pool (global-local prompts)")
    ap.add_argument("--p-sigma1", type=float, default=0.0, help="dit: fraction of samples at sigma = 1 (the 1-step path)")
    ap.add_argument("--w-pix", type=float, default=0.0,
                    help="dit: weight of the pixel loss of the 1-step output (decoded, wavelet-fixed) on sigma=1 samples")
    ap.add_argument("--train-dec", action="store_true", help="dit with --w-pix: train the decoder too (lr --dec-lr)")
    ap.add_argument("--warmup", type=int, default=200, help="dit: warm-up steps")
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--steps", type=int, default=10 ** 9)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--w-lat", type=float, default=0.0)
    ap.add_argument("--w-kl", type=float, default=1e-3)
    ap.add_argument("--w-color", type=float, default=0.0)
    ap.add_argument("--latent-noise", type=float, default=0.05)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--dec-every", type=int, default=4)
    ap.add_argument("--dec-lr", type=float, default=5e-4)
    ap.add_argument("--sample-steps", type=int, default=4)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--p-x1", type=float, default=0.2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--export-dir", default=None)
    ap.add_argument("--color-fix", default="wavelet", choices=["wavelet", "none"])
    a = ap.parse_args()
    global EXPORT_DIR
    EXPORT_DIR = a.export_dir
    if EXPORT_DIR:
        os.makedirs(EXPORT_DIR, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    os.makedirs(os.path.join(DATA, "logs"), exist_ok=True)
    os.makedirs(CKPT, exist_ok=True)
    if a.stage == "init":
        init_from_export(a)
    elif a.stage == "ae":
        a.lr = a.lr or 1e-3
        train_ae(a)
    elif a.stage == "dit":
        a.lr = a.lr or 5e-4
        train_dit(a)
    else:
        a.lr = a.lr or 1e-4
        train_dec(a)


if __name__ == "__main__":
    main()
