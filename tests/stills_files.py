#!/usr/bin/env python3
"""Test stills for tests/stills.rs, made at run time, and what the tests read back from them.

    stills_files.py make SET DIR          SET: formats, orientation, metadata, multipage
    stills_files.py inspect FILE...       JSON, one object per file: pages (size, channels, bits,
                                          compression, ICC digest), tags, quadrant means, ...
    stills_files.py compare IN OUT ...    JSON, per pair: mean absolute difference (0..1) of the images

Independent of pipelines/lib/stills.py on purpose: inputs come from Pillow, tifffile, libtiff's
tiffcp and exiftool, ICC profiles from LittleCMS; outputs are read back with libpng (netpbm's
pngtopam), libtiff + tifffile and exiftool.
"""
import ctypes
import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import tifffile
from PIL import Image

W, H = 64, 48


def texture(h, w, c, bits, seed=0):
    """Smooth ramps (finer than 8 bits) plus film-grain-like noise, so restoration has work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = [0.25 + 0.5 * x / w, 0.3 + 0.4 * y / h, 0.6 - 0.3 * (x + y) / (w + h), 0.4 + 0.5 * x / w]
    a = np.stack([base[i % 4] + rng.normal(0, 0.04, (h, w)) for i in range(c)], -1)
    if c in (2, 4):  # alpha: a smooth ramp from half to fully opaque
        a[:, :, -1] = 0.5 + 0.5 * x / (w - 1)
    top = 65535 if bits == 16 else 255
    return np.clip(np.rint(a * top), 0, top).astype(np.uint16 if bits == 16 else np.uint8)


# ---------------------------------------------------------------------------------------------
# ICC profiles from LittleCMS (liblcms2, which Pillow already depends on)

class XyY(ctypes.Structure):
    _fields_ = [("x", ctypes.c_double), ("y", ctypes.c_double), ("Y", ctypes.c_double)]


def icc_profile(kind):
    """'adobe': Adobe RGB (1998) primaries, gamma 2.2; 'gray': a gray profile, gamma 2.2."""
    lcms = ctypes.CDLL("liblcms2.so.2")
    lcms.cmsBuildGamma.restype = ctypes.c_void_p
    lcms.cmsBuildGamma.argtypes = [ctypes.c_void_p, ctypes.c_double]
    lcms.cmsCreateRGBProfile.restype = ctypes.c_void_p
    lcms.cmsCreateGrayProfile.restype = ctypes.c_void_p
    lcms.cmsSaveProfileToMem.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    lcms.cmsCloseProfile.argtypes = [ctypes.c_void_p]
    gamma = lcms.cmsBuildGamma(None, 563 / 256)
    d65 = XyY(0.3127, 0.3290, 1.0)
    if kind == "adobe":
        prim = (XyY * 3)(XyY(0.64, 0.33, 1), XyY(0.21, 0.71, 1), XyY(0.15, 0.06, 1))
        curves = (ctypes.c_void_p * 3)(gamma, gamma, gamma)
        prof = lcms.cmsCreateRGBProfile(ctypes.byref(d65), prim, curves)
    else:
        prof = lcms.cmsCreateGrayProfile(ctypes.byref(d65), ctypes.c_void_p(gamma))
    n = ctypes.c_uint32(0)
    lcms.cmsSaveProfileToMem(ctypes.c_void_p(prof), None, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lcms.cmsSaveProfileToMem(ctypes.c_void_p(prof), buf, ctypes.byref(n))
    lcms.cmsCloseProfile(ctypes.c_void_p(prof))
    return buf.raw[: n.value]


# ---------------------------------------------------------------------------------------------
# Writers

def png_raw(path, a):
    """A PNG with no filters (Pillow cannot write 16-bit colour PNGs)."""
    h, w, c = a.shape
    bits = 16 if a.dtype == np.uint16 else 8
    data = (a.astype(">u2") if bits == 16 else a).reshape(h, -1).view(np.uint8).reshape(h, -1)
    rows = b"".join(b"\x00" + r.tobytes() for r in data)

    def chunk(k, d):
        return struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))

    ihdr = struct.pack(">IIBBBBB", w, h, bits, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def tiff(path, a, compression="none", planar="contig", **kw):
    """tifffile writes it plain, libtiff's tiffcp compresses it (LZW, Deflate)."""
    c = a.shape[2]
    plain = path + ".plain.tif"
    arr = a[:, :, 0] if c == 1 else a
    if planar == "separate":
        arr = np.moveaxis(a, -1, 0)
    tifffile.imwrite(plain, arr, photometric=kw.pop("photometric", "rgb" if c >= 3 else "minisblack"),
                     planarconfig=planar, extrasamples=["unassalpha"] if c in (2, 4) else None,
                     metadata=None, software=False, **kw)
    subprocess.run(["tiffcp", "-c", {"none": "none", "lzw": "lzw:2", "deflate": "zip:2"}[compression], plain, path],
                   check=True)
    os.remove(plain)


def exiftool(path, *args):
    subprocess.run(["exiftool", "-q", "-q", "-overwrite_original", *args, path], check=True)


CAPTION = "Solvay conference, Brussels 1927 — test caption (é, ü)"
XMP_CAPTION = "XMP: the fifth Solvay conference — test (ß)"
COMMENT = "JPEG COM segment: scanned from the glass plate"
IPTC_CAPTION = "IPTC: Solvay 1927 test caption (ö, ł, Ω)"


def add_metadata(path, icc=None, exif=True, iptc=True, extra=()):
    args = []
    if exif:
        args += [f"-EXIF:ImageDescription={CAPTION}", "-EXIF:Artist=Test Archive", "-EXIF:Copyright=CC0 test",
                 f"-ExifIFD:ExifImageWidth={Image.open(path).size[0]}",
                 f"-ExifIFD:ExifImageHeight={Image.open(path).size[1]}",
                 "-IFD0:XResolution=300", "-IFD0:YResolution=300", "-IFD0:ResolutionUnit=inches"]
    args += [f"-XMP-dc:Description={XMP_CAPTION}", "-XMP-dc:Creator=Test Archive", "-XMP-dc:Rights=CC0"]
    if iptc:
        args += [f"-IPTC:Caption-Abstract={IPTC_CAPTION}", "-IPTC:By-line=Test Archive", "-IPTC:Keywords=solvay"]
    if icc is not None:
        icc_file = path + ".icc"
        with open(icc_file, "wb") as f:
            f.write(icc)
        args.append(f"-ICC_Profile<={icc_file}")
    exiftool(path, "-charset", "iptc=UTF8", "-codedcharacterset=utf8", *args, *extra)
    if icc is not None:
        os.remove(icc_file)


# ---------------------------------------------------------------------------------------------
# Sets

def make_formats(d):
    # PNG: every colour type and depth (palette with transparency included).
    for name, c, bits in (("gray8", 1, 8), ("graya8", 2, 8), ("rgb8", 3, 8), ("rgba8", 4, 8)):
        a = texture(H, W, c, bits, seed=c)
        Image.fromarray(a[:, :, 0] if c == 1 else a, {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[c]).save(
            f"{d}/png_{name}.png")
    Image.fromarray(texture(H, W, 1, 16, seed=5)[:, :, 0].astype(np.uint16), "I;16").save(f"{d}/png_gray16.png")
    png_raw(f"{d}/png_rgb16.png", texture(H, W, 3, 16, seed=6))
    png_raw(f"{d}/png_rgba16.png", texture(H, W, 4, 16, seed=7))
    pal = Image.fromarray(texture(H, W, 3, 8, seed=8)).quantize(64)
    pal.save(f"{d}/png_palette.png", transparency=0)
    # JPEG, WebP.
    Image.fromarray(texture(H, W, 3, 8, seed=9)).save(f"{d}/jpg_rgb.jpg", quality=90)
    Image.fromarray(texture(H, W, 1, 8, seed=10)[:, :, 0]).save(f"{d}/jpg_gray.jpg", quality=90)
    Image.fromarray(texture(H, W, 3, 8, seed=11)).save(f"{d}/webp_rgb.webp", quality=90)
    Image.fromarray(texture(H, W, 4, 8, seed=12)).save(f"{d}/webp_rgba.webp", lossless=True)
    # TIFF: gray/RGB, with and without alpha, 8 and 16 bits; each compression at both depths.
    for name, c, bits, comp in (("gray8", 1, 8, "none"), ("graya8", 2, 8, "lzw"), ("rgb8", 3, 8, "deflate"),
                                ("rgba8", 4, 8, "lzw"), ("gray16", 1, 16, "deflate"), ("graya16", 2, 16, "none"),
                                ("rgb16", 3, 16, "lzw"), ("rgba16", 4, 16, "deflate")):
        tiff(f"{d}/tif_{name}_{comp}.tif", texture(H, W, c, bits, seed=20 + c + bits), comp)
    tiff(f"{d}/tif_rgb16_planar_lzw.tif", texture(H, W, 3, 16, seed=40), "lzw", planar="separate")
    bilevel = (texture(H, W, 1, 8, seed=41) > 110)
    tifffile.imwrite(f"{d}/tif_bilevel.tif", bilevel[:, :, 0], photometric="miniswhite", metadata=None,
                     software=False)
    # Refused loudly, each with its own reason: CMYK, floating point, a truncated file.
    tifffile.imwrite(f"{d}/bad_cmyk.tif", texture(H, W, 4, 8, seed=42), photometric="separated",
                     metadata=None, software=False)
    tifffile.imwrite(f"{d}/bad_float.tif", np.zeros((H, W), np.float32), metadata=None, software=False)
    with open(f"{d}/tif_rgb8_deflate.tif", "rb") as f:
        head = f.read(300)
    with open(f"{d}/bad_truncated.tif", "wb") as f:
        f.write(head)


def marker(h, w):
    """What a viewer shows: a bright block top left, a mid-grey one top right, dark elsewhere."""
    a = np.full((h, w, 3), 30, np.uint8)
    a[: h // 3, : w // 3] = 230
    a[: h // 3, w - w // 3:] = 130
    return a


# Stored image = inverse of the display transform for each EXIF orientation.
INVERSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_270}


def oriented(display, o):
    stored = Image.fromarray(display).transpose(INVERSE[o])
    ex = Image.Exif()
    ex[0x0112] = o
    return stored, ex


def make_orientation(d):
    from PIL import ImageOps

    # The case: a 200x150 JPEG tagged "rotate 90 CW", shown portrait (150x200) by viewers.
    stored, ex = oriented(marker(200, 150), 6)
    stored.save(f"{d}/o6.jpg", exif=ex.tobytes(), quality=92)
    for o in (2, 3, 4, 5, 7, 8):
        stored, ex = oriented(marker(48, 40), o)
        stored.save(f"{d}/o{o}.jpg", exif=ex.tobytes(), quality=92)
    stored, ex = oriented(marker(48, 40), 3)
    stored.save(f"{d}/o3png.png", exif=ex.tobytes())
    # A 16-bit TIFF with orientation 8 (rotate 270 CW) in its own tag.
    disp = marker(48, 40).astype(np.uint16) * 257
    stored = np.rot90(disp, -1)  # the inverse of a 90-degree counter-clockwise turn
    tiff(f"{d}/o8tif.tif", np.ascontiguousarray(stored), "lzw")
    exiftool(f"{d}/o8tif.tif", "-IFD0:Orientation#=8")
    # The fixtures themselves: Pillow shows each as the marker.
    for f in sorted(os.listdir(d)):
        if f.endswith((".jpg", ".png")):
            shown = np.asarray(ImageOps.exif_transpose(Image.open(f"{d}/{f}")).convert("RGB"))
            want = marker(*shown.shape[:2])
            assert np.abs(shown.astype(int) - want).mean() < 4, f"fixture {f} is not shown as the marker"


def make_metadata(d):
    adobe, gray = icc_profile("adobe"), icc_profile("gray")
    h, w = 32, 48
    Image.fromarray(texture(h, w, 3, 8, seed=50)).save(f"{d}/meta_jpg.jpg", quality=90)
    add_metadata(f"{d}/meta_jpg.jpg", adobe, extra=(f"-Comment={COMMENT}",))
    Image.fromarray(texture(h, w, 3, 8, seed=51)).save(f"{d}/meta_png.png")
    add_metadata(f"{d}/meta_png.png", adobe)
    Image.fromarray(texture(h, w, 3, 8, seed=52)).save(f"{d}/meta_webp.webp", quality=90)
    add_metadata(f"{d}/meta_webp.webp", adobe, iptc=False)  # WebP has no place for IPTC
    tiff(f"{d}/meta_tif16.tif", texture(h, w, 3, 16, seed=53), "lzw")
    add_metadata(f"{d}/meta_tif16.tif", adobe)
    tiff(f"{d}/meta_gray16.tif", texture(h, w, 1, 16, seed=54), "deflate")
    add_metadata(f"{d}/meta_gray16.tif", gray)


def make_multipage(d):
    adobe, gray = icc_profile("adobe"), icc_profile("gray")
    plain = f"{d}/pages.plain.tif"
    with tifffile.TiffWriter(plain) as tw:
        tw.write(texture(48, 64, 3, 16, seed=60), photometric="rgb", metadata=None, software=False,
                 extratags=[(34675, 7, len(adobe), adobe, True)])
        tw.write(texture(32, 40, 1, 8, seed=61)[:, :, 0], photometric="minisblack", metadata=None,
                 software=False, extratags=[(34675, 7, len(gray), gray, True)])
        # A reduced-resolution copy of page 1 (NewSubfileType 1), as scanners add for previews.
        tw.write(texture(12, 16, 3, 8, seed=62), photometric="rgb", subfiletype=1, metadata=None, software=False)
    subprocess.run(["tiffcp", "-c", "zip:2", plain, f"{d}/pages.tif"], check=True)
    os.remove(plain)
    exiftool(f"{d}/pages.tif", f"-EXIF:ImageDescription={CAPTION}", f"-XMP-dc:Description={XMP_CAPTION}")


# ---------------------------------------------------------------------------------------------
# Reading back

def pixels(path):
    """Every full-resolution page of a still as float arrays (H, W, C) in 0..1, as stored."""
    low = path.lower()
    if low.endswith(".png"):
        out = subprocess.run(["pngtopam", "-alphapam", path], capture_output=True, check=True).stdout
        head, _, body = out.partition(b"ENDHDR\n")
        f = dict(line.split(b" ", 1) for line in head.split(b"\n")[1:] if b" " in line)
        w, h, c, top = (int(f[k]) for k in (b"WIDTH", b"HEIGHT", b"DEPTH", b"MAXVAL"))
        a = np.frombuffer(body, ">u2" if top > 255 else np.uint8, w * h * c).reshape(h, w, c)
        with open(path, "rb") as png:
            color_type = png.read(26)[25]
        if color_type in (0, 2) and (a[:, :, -1] == top).all():
            a = a[:, :, :-1]  # the opaque alpha pngtopam -alphapam adds
        return [a.astype(np.float64) / top], [top]
    if low.endswith((".tif", ".tiff")):
        plain = path + ".inspect.tif"
        subprocess.run(["tiffcp", "-c", "none", path, plain], check=True)
        try:
            with tifffile.TiffFile(plain) as t:
                pages = [p for p in t.pages if not p.subfiletype & 1]
                arrays, tops = [], []
                for p in pages:
                    a = p.asarray()
                    if p.planarconfig == 2 and p.samplesperpixel > 1:
                        a = np.moveaxis(a, 0, -1)
                    a = a.reshape(a.shape[0], a.shape[1], -1).astype(np.float64)
                    top = 1 if p.bitspersample == 1 else (2 ** p.bitspersample - 1)
                    if p.photometric == tifffile.PHOTOMETRIC.MINISWHITE:
                        a[:, :, 0] = top - a[:, :, 0]
                    arrays.append(a / top)
                    tops.append(top)
                return arrays, tops
        finally:
            os.remove(plain)
    im = Image.open(path)
    a = np.asarray(im.convert("RGBA" if "A" in im.mode else ("L" if im.mode == "L" else "RGB")))
    a = a.reshape(a.shape[0], a.shape[1], -1)
    return [a.astype(np.float64) / 255], [255]


def inspect(path):
    meta = json.loads(subprocess.run(["exiftool", "-j", "-G1", "-n", "-q", "-q", path], capture_output=True,
                                     check=True).stdout)[0]
    icc = subprocess.run(["exiftool", "-b", "-ICC_Profile", path], capture_output=True).stdout
    res = {"file": os.path.basename(path), "type": meta.get("File:FileType"), "pages": [],
           "icc_sha256": hashlib.sha256(icc).hexdigest() if icc else None,
           "tags": {k: v for k, v in meta.items() if (k.split(":")[0] in (
               "IFD0", "ExifIFD", "IFD1", "XMP-dc", "XMP-tiff", "XMP-exif", "IPTC", "PNG", "PNG-pHYs")
               or k == "File:Comment") and not str(v).startswith("(Binary")}}
    arrays, tops = pixels(path)
    if meta.get("File:FileType") == "TIFF":
        with tifffile.TiffFile(path) as t:
            for p in t.pages:
                if p.subfiletype & 1:
                    continue
                icc_p = p.tags.valueof(34675) if 34675 in p.tags else None
                res["pages"].append({
                    "width": p.imagewidth, "height": p.imagelength, "channels": p.samplesperpixel,
                    "bits": p.bitspersample, "compression": tifffile.COMPRESSION(p.compression).name,
                    "icc_sha256": hashlib.sha256(bytes(icc_p)).hexdigest() if icc_p is not None else None})
    else:
        a = arrays[0]
        bits = 16 if tops[0] > 255 else 8
        if meta.get("File:FileType") == "PNG":
            bits = meta["PNG:BitDepth"]
            channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}[meta["PNG:ColorType"]]
        else:
            channels = a.shape[2]
        res["pages"].append({"width": a.shape[1], "height": a.shape[0], "channels": channels, "bits": bits,
                             "compression": None, "icc_sha256": res["icc_sha256"]})
    a = arrays[0]
    h, w = a.shape[:2]
    lum = a[:, :, : 3 if a.shape[2] >= 3 else 1].mean(axis=2)
    res["quadrants"] = [float(lum[: h // 3, : w // 3].mean()), float(lum[: h // 3, w - w // 3:].mean()),
                        float(lum[h - h // 3:, : w // 3].mean()), float(lum[h - h // 3:, w - w // 3:].mean())]
    if tops[0] == 65535:
        v = np.rint(a * 65535).astype(np.int64)
        res["multiples_of_257"] = float((v % 257 == 0).mean())
    return res


def compare(a_path, b_path):
    a, b = pixels(a_path)[0][0], pixels(b_path)[0][0]
    c = min(a.shape[2], b.shape[2])
    if a.shape[:2] != b.shape[:2]:
        return {"error": f"sizes differ: {a.shape} {b.shape}"}
    return {"mean_abs_diff": float(np.abs(a[:, :, :c] - b[:, :, :c]).mean()),
            "alpha_abs_diff": float(np.abs(a[:, :, -1] - b[:, :, -1]).mean()) if a.shape[2] in (2, 4) else None}


def main(argv):
    if argv[0] == "make":
        os.makedirs(argv[2], exist_ok=True)
        {"formats": make_formats, "orientation": make_orientation, "metadata": make_metadata,
         "multipage": make_multipage}[argv[1]](argv[2])
    elif argv[0] == "inspect":
        print(json.dumps([inspect(p) for p in argv[1:]], ensure_ascii=False))
    elif argv[0] == "compare":
        print(json.dumps([compare(a, b) for a, b in zip(argv[1::2], argv[2::2])]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
