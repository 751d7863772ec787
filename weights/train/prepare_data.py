#!/usr/bin/env python3
"""Data preparation for dpir-nano (see shared/design/TRAINING-DATA.md).

Fetches (apt-get download, no root needed after apt-get update) a subset of the Debian packages
listed in the training-data card, unpacks them under $DPIR_DATA/root, builds the image lists from
EXPLICIT paths (never broad globs; any path matching (?i)kodim|kodak is rejected), applies the
card's preparation rules and writes:

  $DPIR_DATA/clean/train/<source>__<name>.png   clean training images (after the x1/2 rule)
  $DPIR_DATA/clean/val/<source>__<name>.png     deterministic validation crops (<= 512 px, sides % 16 == 0)
  $DPIR_DATA/pool_train_<S>.npy                 uint8 [N,S,S,3] crop pool (per-image sampling, flat crops rejected)
  $DPIR_DATA/manifest.json                      what was used, with licences

Split BY SOURCE: train = card rows 1,3,5,6,7,8,9,10 (gcompris, lomiri-16.04, plasma, mate, kphotoalbum,
opencv-doc, dlib, labelme); val = rows 14-17 (lxqt-themes, palapeli-data, libjxl-testdata, scikit-image).
"""
import argparse, fnmatch, glob, io, json, os, re, struct, subprocess, sys, zlib
import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = None
KODAK = re.compile(r"(?i)kodim|kodak")

TRAIN_PKGS = ["gcompris-qt-data", "lomiri-wallpapers-16.04", "plasma-workspace-wallpapers", "mate-backgrounds",
              "kphotoalbum", "opencv-doc", "libdlib19.1", "labelme-examples"]
VAL_PKGS = ["lxqt-themes", "palapeli-data", "libjxl-testdata"]

LICENCES = {
    "gcompris": "GPL-3+ (package default); explore_world_animals per file CC-BY(-SA)/GFDL/PD (Wikimedia Commons)",
    "lomiri16": "CC-BY-4.0 / CC-BY-SA-4.0 / CC0 per file (photographer in file name)",
    "plasma": "GPL-2+ (debian/copyright); LGPL-3 in wallpaper metadata",
    "mate": "GPL-2+ (photographers per file)",
    "kphotoalbum": "GPL-2+",
    "opencv": "Apache-2.0 AND BSD-3-Clause (package); sample photos of mixed provenance (training only)",
    "dlib": "Boost-1.0 (package); PASCAL-VOC/Flickr/press photos (training only)",
    "labelme": "GPL-3+ (package); VOC photos (training only)",
    "lxqt": "CC-BY-SA-3.0 (wallpapers/License)",
    "palapeli": "PD x3, GFDL x2 (Wikimedia Commons)",
    "libjxl": "BSD-3-clause-Google; wesaturate CC0",
    "skimage": "BSD-3; astronaut/rocket NASA/SpaceX, chelsea/coffee CC0",
}


def rcc_files(path):  # Qt .rcc (GCompris), from the data card
    b = open(path, 'rb').read(); assert b[:4] == b'qres'
    ver, tree, data, names = struct.unpack('>IIII', b[4:20]); size = 14 if ver == 1 else 22
    def name(o):
        n, = struct.unpack('>H', b[names + o:names + o + 2])
        return b[names + o + 6:names + o + 6 + 2 * n].decode('utf-16-be')
    def walk(i, prefix):
        p = tree + i * size; noff, flags = struct.unpack('>IH', b[p:p + 6])
        here = prefix + '/' + name(noff) if i else ''
        if flags & 2:
            count, first = struct.unpack('>II', b[p + 6:p + 14])
            for c in range(first, first + count): yield from walk(c, here)
        else:
            off, = struct.unpack('>I', b[p + 10:p + 14]); n, = struct.unpack('>I', b[data + off:data + off + 4])
            blob = b[data + off + 4:data + off + 4 + n]
            yield here, (zlib.decompress(blob[4:]) if flags & 1 else blob)
    yield from walk(0, '')

GCOMPRIS_RCC = ["erase", "explore_monuments", "explore_world_animals", "explore_farm_animals", "explore_world_music", "clickgame"]
GCOMPRIS = ['*/erase/resource/*.webp', '*/explore_monuments/resource/*/*.webp',
            '*/explore_world_animals/resource/animals/*.webp', '*/explore_farm_animals/resource/animals/*.webp',
            '*/explore_world_music/resource/music/*.webp', '*/clickgame/resource/sea*.webp']


def jpeg_quality(im):
    """IJG-style quality estimate from the luminance quantisation table (None if not a JPEG)."""
    q = getattr(im, "quantization", None)
    if not q:
        return None
    base = [16,11,10,16,24,40,51,61,12,12,14,19,26,58,60,55,14,13,16,24,40,57,69,56,14,17,22,29,51,87,80,62,
            18,22,37,56,68,109,103,77,24,35,55,64,81,104,113,92,49,64,78,87,103,121,120,101,72,92,95,98,112,100,103,99]
    t = sorted(q[0]); tb = sorted(base)
    best, bq = 1e18, 50
    for Q in range(1, 101):
        s = 5000 / Q if Q < 50 else 200 - 2 * Q
        tab = sorted(min(255, max(1, (b * s + 50) // 100)) for b in base)
        err = sum(abs(a - c) for a, c in zip(t, tab))
        if err < best:
            best, bq = err, Q
    return bq


def to_rgb(im):
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (128, 128, 128, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def half(im):
    return im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.BOX)


def fetch(root, debs):
    os.makedirs(debs, exist_ok=True)
    need = [p for p in TRAIN_PKGS + VAL_PKGS if not glob.glob(os.path.join(debs, p.replace('+', '*') + "_*.deb"))]
    if need:
        subprocess.run(["apt-get", "download"] + need, cwd=debs, check=True)
    stamp = os.path.join(root, ".unpacked")
    if not os.path.exists(stamp):
        for d in sorted(glob.glob(os.path.join(debs, "*.deb"))):
            subprocess.run(["dpkg-deb", "-x", d, root], check=True)
        open(stamp, "w").close()


def train_sources(R):
    """(source, name, opener, lossy) for every training photo, from explicit paths."""
    out = []
    def f(src, path, lossy=None):
        full = os.path.join(R, path.lstrip('/'))
        if KODAK.search(full):
            return
        if os.path.exists(full):
            out.append((src, os.path.basename(path), lambda p=full: Image.open(p), lossy))
        else:
            print("missing", full, file=sys.stderr)
    # 1 gcompris: lossy WebP -> always x1/2
    for rcc in GCOMPRIS_RCC:
        p = os.path.join(R, "usr/share/gcompris-qt/rcc", rcc + ".rcc")
        for ip, blob in rcc_files(p):
            if any(fnmatch.fnmatch(ip, g) for g in GCOMPRIS) and not KODAK.search(ip):
                out.append(("gcompris", rcc + "_" + ip.split('/')[-1], lambda b=blob: Image.open(io.BytesIO(b)), True))
    # 3 lomiri-16.04
    for n in ["Picture_1A_by_freespace", "Wine_by_Jakkub_Mede", "greentock_by_Peter_Nerlich", "seeding_by_Clements_Engelhardt",
              "aitzgorri_by_Aitzol_Berasategi", "Dragonfly_by_Bolly", "friends_by_Aitzol_Berasategi", "sunset_by_Aitzol_Berasategi",
              "free_by_Peter_Nerlich", "picosdeeuropa_by_Aitzol_Berasategi", "Picture_0B_by_freespace", "life_by_Aitzol_Berasategi",
              "Bridge_by_Sander_Klootwijk"]:
        f("lomiri16", f"/usr/share/backgrounds/{n}.jpg")
    # 5 plasma
    for n in ["BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
              "OneStandsOut", "Path", "summer_1am"]:
        f("plasma", f"/usr/share/wallpapers/{n}/contents/images/2560x1600.jpg")
    # 6 mate nature
    d = os.path.join(R, "usr/share/backgrounds/mate/nature")
    for n in sorted(os.listdir(d)):
        if n.lower().endswith(".jpg"):
            f("mate", f"/usr/share/backgrounds/mate/nature/{n}")
    # 7 kphotoalbum
    d = os.path.join(R, "usr/share/kphotoalbum/demo")
    for n in sorted(os.listdir(d)):
        if n.lower().endswith(".jpg") and n != "qt-logo.jpg":
            f("kphotoalbum", f"/usr/share/kphotoalbum/demo/{n}")
    # 8 opencv-doc
    e = "/usr/share/doc/opencv-doc/examples"
    for n in ["aero1", "aero3", "aloeL", "apple", "baboon", "board", "building", "butterfly", "ela_original", "fruits",
              "home", "left", "leuvenA", "messi5", "orange", "squirrel_cls", "stuff"]:
        f("opencv", f"{e}/data/{n}.jpg")
    for n in ["graf1", "rubberwhale1", "chicky_512"]:
        f("opencv", f"{e}/data/{n}.png", lossy=False)
    for i in range(3):
        f("opencv", f"{e}/hfs/data/00{i}.jpg")
    for i in range(1, 7):
        f("opencv", f"{e}/text/scenetext0{i}.jpg")
    # 9 dlib
    d = os.path.join(R, "usr/share/doc/libdlib19.1/examples/faces")
    for n in sorted(os.listdir(d)):
        if n.lower().endswith(".jpg") and n not in ("bald_guys.jpg", "dogs.jpg"):
            f("dlib", f"/usr/share/doc/libdlib19.1/examples/faces/{n}")
    f("dlib", "/usr/share/doc/libdlib19.1/examples/mmod_cars_test_image.jpg")
    f("dlib", "/usr/share/doc/libdlib19.1/examples/mmod_cars_test_image2.jpg")
    # 10 labelme
    L = "/usr/share/doc/labelme-examples/examples"
    for n in ["2011_000003", "2011_000006", "2011_000025"]:
        f("labelme", f"{L}/semantic_segmentation/data_dataset_voc/JPEGImages/{n}.jpg")
    f("labelme", f"{L}/tutorial/apc2016_obj3.jpg")
    f("labelme", f"{L}/video_annotation/data_dataset_voc/JPEGImages/00000100.jpg")
    return out


def val_sources(R):
    out = []
    def f(src, path, lossy=None):
        full = os.path.join(R, path.lstrip('/'))
        if KODAK.search(full) or not os.path.exists(full):
            print("skip", full, file=sys.stderr); return
        out.append((src, os.path.basename(path), lambda p=full: Image.open(p), lossy))
    for n in ["after-the-rain.jpg", "appleflower.png", "beam.png", "Butterfly-Kenneth-Wimer.jpg", "butterfly.png", "cloud.png",
              "drop.png", "flowers.png", "fog.jpg", "this-is-not-windows.jpg", "Valendas.png"]:
        f("lxqt", f"/usr/share/lxqt/wallpapers/{n}")
    for n in ["castle-maintenon", "cincinnati-bridge", "citrus-fruits", "european-honey-bee", "panther-chameleon-female"]:
        f("palapeli", f"/usr/share/palapeli/collection/{n}.jpg")
    f("libjxl", "/usr/share/libjxl-testdata/jxl/flower/flower.png", False)
    f("libjxl", "/usr/share/libjxl-testdata/jxl/hdr_room.png", False)
    for n in ["cvo9xd_keong_macan_srgb8", "tmshre_riaphotographs_srgb8", "u76c0g_bliznaca_srgb8"]:
        f("libjxl", f"/usr/share/libjxl-testdata/external/wesaturate/500px/{n}.png", False)
    try:  # PyPI scikit-image (same files as Debian python3-skimage)
        import skimage
        sd = os.path.join(os.path.dirname(skimage.__file__), "data")
        for n in ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg", "camera.png",
                  "brick.png", "grass.png", "gravel.png"]:
            p = os.path.join(sd, n)
            if os.path.exists(p) and not KODAK.search(p):
                out.append(("skimage", n, lambda p=p: Image.open(p), None))
            else:
                print("skip (not in this scikit-image; fetched lazily?)", p, file=sys.stderr)
    except ImportError:
        print("scikit-image not installed: skipping its validation photos", file=sys.stderr)
    return out


def load_clean(opener, lossy):
    im = opener()
    q = jpeg_quality(im) if im.format == "JPEG" else None
    if lossy is None:
        lossy = (im.format in ("JPEG", "WEBP") and (q is None or q < 90))
    im = to_rgb(im)
    if lossy:
        im = half(im)
    return im, q, lossy


def crop_pool(images, S, per_image, rng, min_std=0.04):
    """Per-image sampling: draw image uniformly, random crop at random scale in [1/2, 1], reject flat crops."""
    arrs = [np.asarray(im) for im in images]
    pool = []
    n_target = per_image * len(arrs)
    tries = 0
    while len(pool) < n_target and tries < n_target * 20:
        tries += 1
        a = arrs[rng.integers(len(arrs))]
        h, w = a.shape[:2]
        s = rng.uniform(0.5, 1.0)
        side = int(round(S / s))
        if side > min(h, w):
            side = min(h, w)
        if side < S // 2:
            continue
        y = rng.integers(0, h - side + 1); x = rng.integers(0, w - side + 1)
        c = Image.fromarray(a[y:y + side, x:x + side])
        if side != S:
            c = c.resize((S, S), Image.BOX if side > S else Image.BICUBIC)
        c = np.asarray(c)
        lum = (0.299 * c[..., 0] + 0.587 * c[..., 1] + 0.114 * c[..., 2]) / 255.0
        if lum.std() < min_std:
            continue
        if rng.random() < 0.5:
            c = c[:, ::-1]
        pool.append(np.ascontiguousarray(c))
    return np.stack(pool)


def val_crop(im):
    """Card: area-downscale so the short side <= 768, centre crop min(512, short side // 16 * 16)."""
    s = min(im.size)
    if s > 768:
        r = 768 / s
        im = im.resize((max(1, round(im.width * r)), max(1, round(im.height * r))), Image.BOX)
    s = min(im.size)
    side = min(512, s // 16 * 16)
    l = (im.width - side) // 2; t = (im.height - side) // 2
    return im.crop((l, t, l + side, t + side))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("DPIR_DATA", os.path.expanduser("~/dpir-data")))
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--per-image", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fetch", action="store_true")
    a = ap.parse_args()
    R = os.path.join(a.data, "root")
    if not a.no_fetch:
        fetch(R, os.path.join(a.data, "debs"))
    manifest = {"train": [], "val": [], "licences": LICENCES}
    tr_dir = os.path.join(a.data, "clean/train"); va_dir = os.path.join(a.data, "clean/val")
    os.makedirs(tr_dir, exist_ok=True); os.makedirs(va_dir, exist_ok=True)
    train_imgs = []
    for src, name, op, lossy in train_sources(R):
        im, q, used_half = load_clean(op, lossy)
        train_imgs.append(im)
        # the clean training photo itself (after the x1/2 rule), for pools that need whole source images
        # (make_pool_v2.py: global visual prompts from the whole image a crop comes from)
        np.save(os.path.join(tr_dir, f"{len(train_imgs) - 1:03d}_{src}.npy"), np.asarray(im))
        manifest["train"].append({"source": src, "name": name, "jpeg_q": q, "half": used_half, "size": im.size})
    val = []
    for src, name, op, lossy in val_sources(R):
        im, q, used_half = load_clean(op, lossy)
        c = val_crop(im)
        out = os.path.join(va_dir, f"{src}__{os.path.splitext(name)[0]}.png")
        c.save(out)
        val.append(out)
        manifest["val"].append({"source": src, "name": name, "jpeg_q": q, "half": used_half, "crop": c.size})
    rng = np.random.default_rng(a.seed)
    pool = crop_pool(train_imgs, a.crop, a.per_image, rng)
    np.save(os.path.join(a.data, f"pool_train_{a.crop}.npy"), pool)
    mp = sum(w * h for w, h in (im.size for im in train_imgs)) / 1e6
    manifest["summary"] = {"train_photos": len(train_imgs), "train_megapixels_after_half_rule": round(mp, 1),
                           "val_photos": len(val), "pool": list(pool.shape)}
    by = {}
    for e in manifest["train"]:
        by[e["source"]] = by.get(e["source"], 0) + 1
    manifest["summary"]["train_by_source"] = by
    by = {}
    for e in manifest["val"]:
        by[e["source"]] = by.get(e["source"], 0) + 1
    manifest["summary"]["val_by_source"] = by
    json.dump(manifest, open(os.path.join(a.data, "manifest.json"), "w"), indent=1)
    print(json.dumps(manifest["summary"]))


if __name__ == "__main__":
    main()
