#!/usr/bin/env python3
"""Pregenerate dpir-nano v2's degraded training pool (degrade.degrade_seeded: real codecs through GStreamer, film
damage, x1 / x2 / x4) with what DPIR's global-local visual training needs.

Per entry, from one clean training photo ($DPIR_DATA/clean/train/*.npy, written by prepare_data.py):
  hq    [256,256,3]  a "frame": a random square region of the photo (side 256..min side), area-resized to 256
  lq    [256,256,3]  that frame degraded at `scale` and bicubic-upsampled back to 256 (what the element feeds the model)
  glob  [224,224,3]  the WHOLE photo's CLIP view (centre square of the shortest side, as CLIPImageProcessor crops),
                     at frame resolution (256), degraded with the SAME recipe (same seed), upsampled, resized to 224:
                     the global visual prompt of the clip / image the frame belongs to
  meta  [N,4] int32  scale, kind (0 video, 1 photo, 2 archival, 3 mild), photo index, region side
train.py (`dit`/`dec` with --pool v2) takes random 128 crops of hq/lq (the tile being restored), the local prompt
from the degraded frame (as src/engine/dpir.rs: the whole frame) or the crop, the global prompt from glob.

Files: $DPIR_DATA/pool_{NAME}_{hq,lq,glob,meta}.npy (NAME: --name, default v2).
Usage: make_pool_v2.py [--n 8000] [--workers 2] [--name v2] [--kinds mild:0.5,video:0.5] [--scales 1:0.6,2:0.4]
(--kinds / --scales: draw the degradation kind / scale from these weights instead of degrade.py's mix and
0.45 / 0.45 / 0.10; the `mild` pool the fusion stage was fine-tuned with is --name mild --kinds mild:0.5,video:0.5.)
"""
import argparse, glob, os, sys, time
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from degrade import degrade_seeded

DATA = os.environ.get("DPIR_DATA", os.path.expanduser("~/dpir-data"))
KINDS = {"video": 0, "photo": 1, "archival": 2, "mild": 3}
F, G = 256, 224
_IMGS = {}


def _img(path):
    if path not in _IMGS:
        _IMGS[path] = np.load(path, mmap_mode="r")
    return _IMGS[path]


def _resize(a, side):
    im = Image.fromarray(np.ascontiguousarray(a))
    return np.asarray(im.resize((side, side), Image.BOX if a.shape[0] > side else Image.BICUBIC))


def _weights(spec):
    """"a:0.5,b:0.5" -> ([a, b], [0.5, 0.5]) (normalised); None -> None."""
    if not spec:
        return None
    keys, w = zip(*((k, float(v)) for k, v in (kv.split(":") for kv in spec.split(","))))
    w = np.array(w) / sum(w)
    return list(keys), w


def make_entry(files, seed, kinds=None, scales=None):
    rng = np.random.default_rng([seed, 77])
    for _ in range(50):
        j = int(rng.integers(len(files)))
        a = _img(files[j])
        h, w = a.shape[:2]
        m = min(h, w)
        if m < F // 2:
            continue
        if m <= F:
            side = m
        elif rng.random() < 0.6:
            side = int(rng.integers(F, min(512, m) + 1))
        else:
            side = int(rng.integers(min(512, m), m + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        hq = _resize(a[y:y + side, x:x + side], F)
        lum = (0.299 * hq[..., 0] + 0.587 * hq[..., 1] + 0.114 * hq[..., 2]) / 255.0
        if lum.std() < 0.04:
            continue
        flip = rng.random() < 0.5
        t, l = (h - m) // 2, (w - m) // 2
        gq = _resize(a[t:t + m, l:l + m], F)
        if flip:
            hq, gq = hq[:, ::-1], gq[:, ::-1]
        hq, gq = np.ascontiguousarray(hq), np.ascontiguousarray(gq)
        sk, sw = scales or (["1", "2", "4"], [0.45, 0.45, 0.10])
        scale = int(sk[int(rng.choice(len(sk), p=sw))])
        dseed = int(rng.integers(1 << 62))
        kind = kinds[0][int(rng.choice(len(kinds[0]), p=kinds[1]))] if kinds else None
        _, lq, info = degrade_seeded(hq, dseed, scale, kind=kind)
        _, gup, _ = degrade_seeded(gq, dseed, scale, kind=info["kind"])
        g = np.asarray(Image.fromarray(gup).resize((G, G), Image.BICUBIC))
        return hq, lq, g, np.array([scale, KINDS[info["kind"]], j, side], np.int32)
    raise RuntimeError("no usable photo")


def work(args):
    files, lo, hi, base, name, kinds, scales = args
    out = {k: np.load(os.path.join(DATA, f"pool_{name}_{k}.npy"), mmap_mode="r+") for k in ("hq", "lq", "glob", "meta")}
    t0 = time.time()
    for i in range(lo, hi):
        hq, lq, g, meta = make_entry(files, base + i, kinds, scales)
        out["hq"][i], out["lq"][i], out["glob"][i], out["meta"][i] = hq, lq, g, meta
        if (i - lo) % 500 == 0:
            print(f"[{lo}] {i - lo}/{hi - lo} {time.time() - t0:.0f}s", flush=True)
    for v in out.values():
        v.flush()
    return hi - lo


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=20261202)
    ap.add_argument("--name", default="v2")
    ap.add_argument("--kinds", default="")
    ap.add_argument("--scales", default="")
    a = ap.parse_args()
    files = sorted(glob.glob(os.path.join(DATA, "clean/train/*.npy")))
    assert files, "run prepare_data.py first (it writes clean/train/*.npy)"
    shapes = {"hq": (a.n, F, F, 3), "lq": (a.n, F, F, 3), "glob": (a.n, G, G, 3), "meta": (a.n, 4)}
    for k, s in shapes.items():
        np.lib.format.open_memmap(os.path.join(DATA, f"pool_{a.name}_{k}.npy"), mode="w+",
                                  dtype=np.int32 if k == "meta" else np.uint8, shape=s).flush()
    t0 = time.time()
    bounds = np.linspace(0, a.n, a.workers + 1).astype(int)
    jobs = [(files, int(bounds[i]), int(bounds[i + 1]), a.seed * 1000003, a.name, _weights(a.kinds), _weights(a.scales))
            for i in range(a.workers)]
    if a.workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(a.workers) as p:
            done = sum(p.map(work, jobs))
    else:
        done = work(jobs[0])
    meta = np.load(os.path.join(DATA, f"pool_{a.name}_meta.npy"))
    print(f"{done} entries in {time.time() - t0:.0f} s; scale counts", {s: int((meta[:, 0] == s).sum()) for s in (1, 2, 4)},
          "kinds", {k: int((meta[:, 1] == v).sum()) for k, v in KINDS.items()})


if __name__ == "__main__":
    main()
