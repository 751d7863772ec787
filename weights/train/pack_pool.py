#!/usr/bin/env python3
"""Pack the crop pool for a GPU machine: `pool_train_128.npy` (340 MB) -> `pool_train_128.jpgpack` (+ `.offsets.npy`),
a random subset as JPEG q90 4:4:4 (~7 KB a crop; q90 is ~40 dB from the PNG-exact crop, far above what the model
reaches), so the pool, the code and the wheels fit the 64 MiB a device call carries. train.py reads either form.
Usage: pack_pool.py OUT_DIR [--n 6000]"""
import argparse, io, os
import numpy as np
from PIL import Image

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--n", type=int, default=6000)
ap.add_argument("--quality", type=int, default=90)
a = ap.parse_args()
data = os.environ.get("DPIR_DATA", os.path.expanduser("~/dpir-data"))
pool = np.load(os.path.join(data, "pool_train_128.npy"), mmap_mode="r")
idx = np.sort(np.random.default_rng(7).permutation(len(pool))[:a.n])
os.makedirs(a.out, exist_ok=True)
offs, blobs, pos = [0], [], 0
for i in idx:
    b = io.BytesIO()
    Image.fromarray(np.asarray(pool[i])).save(b, "JPEG", quality=a.quality, subsampling=0)
    blobs.append(b.getvalue()); pos += len(blobs[-1]); offs.append(pos)
with open(os.path.join(a.out, "pool_train_128.jpgpack"), "wb") as f:
    f.write(b"".join(blobs))
np.save(os.path.join(a.out, "pool_train_128.jpgpack.offsets.npy"), np.array(offs, dtype=np.int64))
print(f"{len(idx)} crops, {pos / 1e6:.1f} MB")
