#!/usr/bin/env python3
"""Restore every still of a folder through dpirrestore, as an archive keeps them (the driver of
pipelines/restore-stills.sh; docs/stills.md says what it does and why).

    stills.py [--format auto|png|tiff] IN_DIR OUT_DIR [dpirrestore property=value ...]

Per still: decode (JPEG and WebP through GStreamer; PNG through libpng, netpbm's pngtopam, and TIFF
through libtiff's tiffcp and tifffile, as GStreamer 1.22 garbles 16-bit colour PNGs and decodes
neither 16-bit nor most 8-bit TIFFs), apply the EXIF/TIFF orientation, restore in a GStreamer pipeline (appsrc ! dpirrestore ! appsink; 16-bit stays
16-bit as RGBA64_LE), write PNG or TIFF in the input's mode (gray/RGB, alpha, 8/16 bits) with the
input's ICC profile and resolution, copy EXIF, XMP and IPTC with exiftool (orientation reset,
dimensions updated), check the result and only then rename it into place.
"""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib

try:
    import numpy as np
    import tifffile
    from PIL import Image
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstVideo", "1.0")
    from gi.repository import Gst, GstVideo
except ImportError as e:  # one line that says what to install, not a traceback
    sys.exit(f"restore-stills: ERROR: {e.name or e} is missing: run tests/setup-debian.sh (Debian python3-numpy, "
             "python3-tifffile, python3-pil, python3-gi) or set DPIR_PYTHON to a Python that has them")

EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")
TIFF_EXTS = (".tif", ".tiff")


class Refused(Exception):
    """A still that cannot be restored; the message is the one-line reason."""


class Page:
    """One image: pixels (H, W, C) uint8 or uint16 with C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA."""

    def __init__(self, pixels, icc=None, orientation=1, alpha_kind=2, resolution=None):
        self.pixels = pixels
        self.icc = icc
        self.orientation = orientation
        self.alpha_kind = alpha_kind  # TIFF ExtraSamples: 1 associated (premultiplied), 2 unassociated
        self.resolution = resolution  # (x, y, unit) with unit "inch" or "cm", or None


# ---------------------------------------------------------------------------------------------
# Metadata (exiftool)

def exiftool_json(path):
    r = subprocess.run(["exiftool", "-j", "-G1", "-n", "-q", "-q", os.path.abspath(path)],
                       capture_output=True, text=True)
    try:
        return json.loads(r.stdout)[0]
    except (ValueError, IndexError):
        raise Refused(f"exiftool cannot read it: {r.stderr.strip() or 'no output'}")


# IFD0 tags of a TIFF that describe its pixels rather than the picture (present in every TIFF,
# so not a sign that the file has EXIF metadata).
TIFF_LAYOUT = {
    "SubfileType", "OldSubfileType", "ImageWidth", "ImageHeight", "BitsPerSample", "Compression",
    "PhotometricInterpretation", "Thresholding", "CellWidth", "CellLength", "FillOrder", "StripOffsets",
    "Orientation", "SamplesPerPixel", "RowsPerStrip", "StripByteCounts", "MinSampleValue", "MaxSampleValue",
    "XResolution", "YResolution", "PlanarConfiguration", "ResolutionUnit", "Predictor", "ColorMap",
    "TileWidth", "TileLength", "TileOffsets", "TileByteCounts", "ExtraSamples", "SampleFormat",
    "YCbCrCoefficients", "YCbCrSubSampling", "YCbCrPositioning", "ReferenceBlackWhite", "PageNumber",
    "Software", "T4Options", "T6Options", "GrayResponseUnit", "GrayResponseCurve", "XPosition", "YPosition",
    "PageName", "DocumentName", "ExifOffset", "GPSInfo", "ICC_Profile", "ApplicationNotes", "IPTC-NAA",
    "PhotoshopSettings", "XMP",
}


# PNG's predefined text keywords (PNG 1.2, 11.3.4.2); "Comment" counts as a comment.
PNG_TEXT = {"Title", "Author", "Description", "Copyright", "CreationTime", "Software", "Disclaimer", "Warning",
            "Source"}


def fields(meta):
    """Which of ICC, EXIF, XMP, IPTC, comment (JPEG COM or PNG Comment) and PNG text a file holds
    (from its exiftool -G1 JSON)."""
    tiff = meta.get("File:FileType") == "TIFF"
    have = set()
    for key in meta:
        group, _, tag = key.partition(":")
        if group.startswith("ICC"):
            have.add("ICC")
        elif group.startswith("XMP"):
            have.add("XMP")
        elif group == "IPTC":
            have.add("IPTC")
        elif group in ("ExifIFD", "GPS", "InteropIFD", "MakerNotes") or group.startswith("SubIFD"):
            have.add("EXIF")
        elif re.fullmatch(r"IFD\d+", group) and not (tiff and tag in TIFF_LAYOUT):
            # In a TIFF, IFD0, IFD1, ... are its pages: only their descriptive tags are EXIF.
            have.add("EXIF")
        elif key in ("File:Comment", "PNG:Comment"):
            have.add("comment")
        elif group == "PNG" and tag in PNG_TEXT:
            have.add("PNG text")
    return have


# ---------------------------------------------------------------------------------------------
# GStreamer

def run_pipeline(pipeline, sink, src=None, data=None):
    """Play until EOS; returns the appsink's samples. Raises Refused with GStreamer's error."""
    bus = pipeline.get_bus()
    try:
        if pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            msg = bus.timed_pop_filtered(Gst.SECOND, Gst.MessageType.ERROR)
            raise Refused(msg.parse_error()[0].message if msg else "the pipeline does not start")
        if src is not None:
            buf = Gst.Buffer.new_wrapped(data)
            buf.pts = 0
            src.emit("push-buffer", buf)
            src.emit("end-of-stream")
        warnings = []
        while True:
            # A bounded wait, so that Ctrl-C is seen (and the temporary files go) within 0.1 s.
            msg = bus.timed_pop_filtered(100 * Gst.MSECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR
                                         | Gst.MessageType.WARNING)
            if msg is None:
                continue
            if msg.type == Gst.MessageType.EOS:
                break
            if msg.type == Gst.MessageType.WARNING:
                warnings.append(msg.parse_warning()[0].message)
                continue
            err, dbg = msg.parse_error()
            raise Refused(f"{msg.src.get_name()}: {err.message}")
        samples = []
        while (s := sink.emit("try-pull-sample", 0)) is not None:
            samples.append(s)
        if not samples and warnings:
            raise Refused(f"no frame ({'; '.join(warnings)})")
        return samples
    finally:
        pipeline.set_state(Gst.State.NULL)


def sample_to_array(sample):
    caps = sample.get_caps()
    info = GstVideo.VideoInfo.new_from_caps(caps)
    fmt = info.finfo.format
    w, h, stride = info.width, info.height, info.stride[0]
    channels, dtype = {
        GstVideo.VideoFormat.GRAY8: (1, np.uint8), GstVideo.VideoFormat.GRAY16_LE: (1, "<u2"),
        GstVideo.VideoFormat.RGBX: (4, np.uint8), GstVideo.VideoFormat.RGBA: (4, np.uint8),
        GstVideo.VideoFormat.RGBA64_LE: (4, "<u2"),
    }[fmt]
    item = np.dtype(dtype).itemsize
    buf = sample.get_buffer()
    raw = buf.extract_dup(0, buf.get_size())
    rows = np.frombuffer(raw, np.uint8)[: stride * (h - 1) + w * channels * item]
    rows = np.lib.stride_tricks.as_strided(rows, (h, w * channels * item), (stride, 1))
    return np.ascontiguousarray(rows).view(dtype).reshape(h, w, channels).astype(
        np.uint16 if item == 2 else np.uint8)


def make(factory, **props):
    e = Gst.ElementFactory.make(factory, None)
    if e is None:
        raise Refused(f"GStreamer element {factory} is missing (run tests/setup-debian.sh)")
    for k, v in props.items():
        e.set_property(k.replace("_", "-"), v)
    return e


def gst_decode(path, fmt, jpeg):
    """Decode a PNG/JPEG/WebP into an (H, W, C) array of GStreamer format `fmt`."""
    chains = [["decodebin"]]
    if jpeg:
        # GStreamer 1.22's jpegdec only warns on some JPEGs (the grayscale Solvay 1927 scan) and
        # ends with no frame; libav's MJPEG decoder reads them.
        chains.append(["jpegparse", "avdec_mjpeg"])
    reasons = []
    for chain in chains:
        pipeline = Gst.Pipeline.new(None)
        src = make("filesrc", location=path)
        conv = make("videoconvert")
        caps = make("capsfilter", caps=Gst.Caps.from_string(f"video/x-raw,format={fmt}"))
        sink = make("appsink", sync=False, wait_on_eos=False)  # EOS even with the frame unpulled
        parts = [make(f) for f in chain]
        for e in [src, *parts, conv, caps, sink]:
            pipeline.add(e)
        src.link(parts[0])
        for a, b in zip(parts, parts[1:]):
            a.link(b)
        if chain[0] == "decodebin":
            parts[0].connect("pad-added", lambda _d, pad, c=conv: pad.link(c.get_static_pad("sink")))
        else:
            parts[-1].link(conv)
        conv.link(caps)
        caps.link(sink)
        try:
            samples = run_pipeline(pipeline, sink)
            if samples:
                return sample_to_array(samples[0])
            reasons.append(f"{' ! '.join(chain)}: no frame")
        except Refused as e:
            reasons.append(f"{' ! '.join(chain)}: {e}")
    raise Refused("GStreamer cannot decode it (" + "; ".join(reasons) + ")")


def check_props(props):
    """dpirrestore exists and has every property given (a typo fails before any file is read);
    returns the scale they set."""
    e = Gst.ElementFactory.make("dpirrestore", None)
    if e is None:
        sys.exit("restore-stills: ERROR: GStreamer has no dpirrestore element: build the plugin "
                 "(cargo build --release) and set GST_PLUGIN_PATH to the folder holding libgstdpir.so")
    for p in props:
        name, eq, value = p.partition("=")
        if not eq or e.find_property(name) is None:
            sys.exit(f"restore-stills: ERROR: '{p}' is not a dpirrestore property=value "
                     "(gst-inspect-1.0 dpirrestore lists them)")
        Gst.util_set_object_arg(e, name, value)
    return e.get_property("scale")  # as the element parses it


def restore(rgba, props):
    """Run one (H, W, 4) RGBA image (uint8 or uint16) through dpirrestore; returns the result."""
    h, w, _ = rgba.shape
    fmt = "RGBA64_LE" if rgba.dtype == np.uint16 else "RGBA"
    caps = Gst.Caps.from_string(f"video/x-raw,format={fmt},width={w},height={h},framerate=0/1,"
                                "pixel-aspect-ratio=1/1")
    pipeline = Gst.Pipeline.new(None)
    src = make("appsrc", caps=caps, format=Gst.Format.TIME)
    dpir = make("dpirrestore")
    for p in props:
        name, _, value = p.partition("=")
        Gst.util_set_object_arg(dpir, name, value)
    out_caps = make("capsfilter", caps=Gst.Caps.from_string(f"video/x-raw,format={fmt}"))
    sink = make("appsink", sync=False, wait_on_eos=False)  # EOS even with the frame unpulled
    for e in (src, dpir, out_caps, sink):
        pipeline.add(e)
    src.link(dpir)
    dpir.link(out_caps)
    out_caps.link(sink)
    data = rgba.astype("<u2").tobytes() if fmt == "RGBA64_LE" else rgba.tobytes()
    samples = run_pipeline(pipeline, sink, src, data)
    if len(samples) != 1:
        raise Refused(f"dpirrestore gave {len(samples)} frames for one still")
    return sample_to_array(samples[0])


# ---------------------------------------------------------------------------------------------
# Reading

def read_tiff(path, tmpdir):
    """Every full-resolution page of a TIFF. libtiff (tiffcp) undoes the compression (LZW,
    Deflate, PackBits, CCITT, ...) and the predictor; tifffile reads the plain copy."""
    plain = os.path.join(tmpdir, "plain.tif")
    r = subprocess.run(["tiffcp", "-c", "none", path, plain], capture_output=True, text=True)
    if r.returncode != 0:
        raise Refused(f"libtiff cannot read it: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
    with tifffile.TiffFile(path) as tif:
        compression = tif.pages[0].compression
    pages, skipped = [], 0
    with tifffile.TiffFile(plain) as tif:
        for n, p in enumerate(tif.pages):
            if p.subfiletype & 1:  # a reduced-resolution copy (thumbnail, pyramid level)
                skipped += 1
                continue
            pages.append(tiff_page(p, n + 1))
    if not pages:
        raise Refused("the TIFF holds no full-resolution image")
    return pages, skipped, compression


def tiff_page(p, n):
    where = f"page {n}: " if n > 1 else ""
    PH = tifffile.PHOTOMETRIC
    if p.sampleformat not in (1,) or p.bitspersample not in (1, 8, 16):
        raise Refused(f"{where}{p.bitspersample}-bit {tifffile.SAMPLEFORMAT(p.sampleformat).name.lower()} "
                      "samples are not supported (8- or 16-bit unsigned integers, or 1-bit)")
    if p.photometric not in (PH.MINISBLACK, PH.MINISWHITE, PH.RGB, PH.PALETTE):
        raise Refused(f"{where}{PH(p.photometric).name} TIFFs are not supported (gray, RGB or palette only)")
    a = p.asarray()
    if p.samplesperpixel > 1 and p.planarconfig == 2:
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[:, :, None]
    if p.bitspersample == 1:
        a = a.astype(np.uint8) * 255
    color = 3 if p.photometric == PH.RGB else 1
    extras = tuple(p.extrasamples or ())
    alpha_kind = extras[0] if extras and extras[0] in (1, 2) else None
    a = a[:, :, : color + (1 if alpha_kind else 0)]
    if p.photometric == PH.MINISWHITE:
        top = 65535 if a.dtype == np.uint16 else 255
        a = a.copy()
        a[:, :, 0] = top - a[:, :, 0]
    if p.photometric == PH.PALETTE:
        cmap = p.colormap  # (3, 2**bits) uint16
        rgb = np.moveaxis(cmap[:, a[:, :, 0]], 0, -1)
        a = (rgb >> 8).astype(np.uint8)
    tags = p.tags
    icc = tags.valueof(34675) if 34675 in tags else None
    if icc is not None and not isinstance(icc, bytes):
        icc = bytes(np.asarray(icc, np.uint8))
    res = None
    if 282 in tags and 283 in tags and tags.valueof(296, 2) in (2, 3):
        rx, ry = tags.valueof(282), tags.valueof(283)
        res = (rx[0] / rx[1], ry[0] / ry[1], "inch" if tags.valueof(296, 2) == 2 else "cm")
    return Page(a, icc, int(tags.valueof(274, 1)), alpha_kind or 2, res)


def png_mode(path):
    """(bit depth, gray, alpha) of a PNG from its chunks (IHDR, and tRNS: transparency)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise Refused("not a PNG (no PNG signature)")
    depth, ctype = data[24], data[25]
    trns, pos = False, 8
    while pos + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind in (b"tRNS", b"IDAT"):
            trns = kind == b"tRNS"
            break
        pos += 12 + n
    return depth, ctype in (0, 4), ctype in (4, 6) or trns


def read_pam(data):
    """A netpbm image (P5, P6 or P7 with maxval < 65536) as an (H, W, C) array."""
    if data[:2] == b"P7":
        head, _, body = data.partition(b"ENDHDR\n")
        fields = dict(line.split(b" ", 1) for line in head.split(b"\n")[1:] if b" " in line)
        w, h, c, top = (int(fields[k]) for k in (b"WIDTH", b"HEIGHT", b"DEPTH", b"MAXVAL"))
    else:
        m = re.match(rb"P([56])\s+(\d+)\s+(\d+)\s+(\d+)\s", data)
        if not m:
            raise Refused("the PNG decoder gave no image")
        c, w, h, top = (1 if m.group(1) == b"5" else 3), int(m.group(2)), int(m.group(3)), int(m.group(4))
        body = data[m.end():]
    a = np.frombuffer(body, ">u2" if top > 255 else np.uint8, w * h * c).reshape(h, w, c)
    if top > 255:
        return a.astype(np.uint16)
    if top < 255:  # 1-, 2- and 4-bit gray
        return (a.astype(np.uint16) * 255 // top).astype(np.uint8)
    return a.copy()


def read_png(path):
    """A PNG through libpng (netpbm's pngtopam): GStreamer 1.22's pngdec shifts the samples of
    16-bit colour PNGs and avdec_png does not output them at all."""
    depth, gray, alpha = png_mode(path)
    r = subprocess.run(["pngtopam"] + (["-alphapam"] if alpha else []) + [path], capture_output=True)
    if r.returncode != 0:
        raise Refused(f"libpng cannot decode it: {r.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
    a = read_pam(r.stdout)
    if gray and a.shape[2] >= 3:  # a gray PNG with a palette-like tRNS comes out RGB: take one channel
        a = a[:, :, [0, 3]] if a.shape[2] == 4 else a[:, :, :1]
    if depth == 16 and a.dtype != np.uint16:
        raise Refused("libpng gave 8-bit samples for a 16-bit PNG")
    return a


def read_other(path, meta):
    """A PNG (libpng), JPEG or WebP (GStreamer), its mode read from its header (Pillow, without
    decoding)."""
    try:
        with Image.open(path) as im:
            mode, info = im.mode, dict(im.info)
    except Exception as e:
        raise Refused(f"not a readable image ({e})")
    if path.lower().endswith(".png"):
        a = read_png(path)
    else:
        jpeg = path.lower().endswith((".jpg", ".jpeg"))
        gray = mode in ("1", "L", "LA", "La")
        alpha = mode in ("LA", "La", "RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in info)
        if gray and not alpha:
            a = gst_decode(path, "GRAY8", jpeg)
        else:
            a = gst_decode(path, "RGBA" if alpha else "RGBx", jpeg)
            a = a[:, :, [0, 3]] if gray else (a if alpha else a[:, :, :3])
    res = None
    if "IFD0:XResolution" in meta and meta.get("IFD0:ResolutionUnit", 2) in (2, 3):
        res = (meta["IFD0:XResolution"], meta.get("IFD0:YResolution", meta["IFD0:XResolution"]),
               "inch" if meta.get("IFD0:ResolutionUnit", 2) == 2 else "cm")
    elif meta.get("PNG-pHYs:PixelUnits") == 1:
        res = (meta["PNG-pHYs:PixelsPerUnitX"] / 100, meta["PNG-pHYs:PixelsPerUnitY"] / 100, "cm")
    elif meta.get("JFIF:ResolutionUnit") in (1, 2):
        res = (meta["JFIF:XResolution"], meta["JFIF:YResolution"],
               "inch" if meta["JFIF:ResolutionUnit"] == 1 else "cm")
    icc = info.get("icc_profile") or None
    if icc is not None and mode == "CMYK":
        icc = ("CMYK", icc)  # the pixels come out RGB: a CMYK profile would describe them wrongly
    return Page(a, icc, int(meta.get("IFD0:Orientation", 1) or 1), 2, res)


# ---------------------------------------------------------------------------------------------
# Orientation and modes

def orient(a, o):
    """Turn stored pixels into the image as displayed for EXIF/TIFF orientation o (1..8)."""
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }.get(o, lambda a: a)(a)


def to_rgba(a):
    top = 65535 if a.dtype == np.uint16 else 255
    h, w, c = a.shape
    gray = c <= 2
    rgb = np.repeat(a[:, :, :1], 3, axis=2) if gray else a[:, :, :3]
    alpha = a[:, :, -1:] if c in (2, 4) else np.full((h, w, 1), top, a.dtype)
    return np.concatenate([rgb, alpha], axis=2)


def from_rgba(rgba, channels):
    """Back to the input's mode: gray takes the restored image's luma (Rec. 709 weights)."""
    if channels >= 3:
        return rgba[:, :, :channels]
    top = 65535 if rgba.dtype == np.uint16 else 255
    y = rgba[:, :, :3].astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])
    y = np.clip(np.rint(y), 0, top).astype(rgba.dtype)[:, :, None]
    return np.concatenate([y, rgba[:, :, 3:]], axis=2) if channels == 2 else y


# ---------------------------------------------------------------------------------------------
# Writing

def write_png(path, a, icc, res):
    h, w, c = a.shape
    depth = 16 if a.dtype == np.uint16 else 8

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = (a.astype(">u2") if depth == 16 else a).reshape(h, -1).view(np.uint8).reshape(h, -1)
    up = raw.copy()
    up[1:] -= raw[:-1]  # filter "Up" on every row (modulo 256), which zlib compresses better
    rows = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, {1: 0, 2: 4, 3: 2, 4: 6}[c],
                                                              0, 0, 0))
    if icc:
        png += chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc))
    if res:
        per_m = 100 if res[2] == "cm" else 100 / 2.54
        png += chunk(b"pHYs", struct.pack(">IIB", round(res[0] * per_m), round(res[1] * per_m), 1))
    png += chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


TIFF_COMPRESSION = {1: "none", 5: "lzw:2", 8: "zip:2", 32946: "zip:2", 32773: "packbits"}
TIFF_COMPRESSION_NAME = {"none": "uncompressed", "lzw:2": "LZW", "zip:2": "Deflate", "packbits": "PackBits"}


def write_tiff(path, pages, compression, tmpdir):
    """pages: list of (array, page); tifffile writes them plain, libtiff's tiffcp compresses."""
    plain = os.path.join(tmpdir, "out-plain.tif")
    with tifffile.TiffWriter(plain) as tw:
        for a, page in pages:
            c = a.shape[2]
            extratags = [(34675, 7, len(page.icc), page.icc, True)] if page.icc else []
            kw = {}
            if page.resolution:
                kw["resolution"] = page.resolution[:2]
                kw["resolutionunit"] = "INCH" if page.resolution[2] == "inch" else "CENTIMETER"
            tw.write(a if c > 1 else a[:, :, 0], photometric="rgb" if c >= 3 else "minisblack",
                     planarconfig="contig", extrasamples=[page.alpha_kind] if c in (2, 4) else None,
                     compression=None, metadata=None, software=False, extratags=extratags, **kw)
    r = subprocess.run(["tiffcp", "-c", compression, plain, path], capture_output=True, text=True)
    if r.returncode != 0:
        raise Refused(f"tiffcp could not write the TIFF: {r.stderr.strip()}")


def copy_metadata(src, dst, meta, size, orientation, is_tiff_in, res):
    """EXIF, XMP and IPTC from src into dst with exiftool: orientation 1, dimensions and
    resolution those of the output. The ICC profile is written by the pixel writers."""
    w, h = size
    args = ["exiftool", "-q", "-q", "-m", "-overwrite_original", "-tagsFromFile", os.path.abspath(src),
            "-all:all", "--ICC_Profile:all", "--ICC-header:all", "--PNG-pHYs:all"]
    if is_tiff_in:
        args.append("--IFD1:all")  # in a TIFF, IFD1 is the second page, not an EXIF thumbnail
    elif orientation != 1:
        args.append("--IFD1:all")  # the EXIF thumbnail would show the picture turned
    if "File:Comment" in meta and dst.endswith(".png"):
        args.append("-PNG:Comment<File:Comment")  # a JPEG's COM segment: PNG has a keyword for it
    if any(k.startswith("IPTC:") for k in meta):
        # IPTC text is Latin-1 unless the envelope says UTF-8, and -tagsFromFile does not copy that
        # flag: say UTF-8, so that exiftool writes every caption character as it read it.
        args.append("-IPTC:CodedCharacterSet=UTF8")
    for group, tag in (("IFD0", "Orientation"), ("XMP-tiff", "Orientation")):
        if f"{group}:{tag}" in meta:
            args.append(f"-{group}:{tag}#=1")
    for group, wtag, htag in (("ExifIFD", "ExifImageWidth", "ExifImageHeight"),
                              ("XMP-exif", "PixelXDimension", "PixelYDimension"),
                              ("XMP-tiff", "ImageWidth", "ImageHeight")):
        if f"{group}:{wtag}" in meta or f"{group}:{htag}" in meta:
            args += [f"-{group}:{wtag}#={w}", f"-{group}:{htag}#={h}"]
    if "IFD0:XResolution" in meta and res:
        args += [f"-IFD0:XResolution#={res[0]:g}", f"-IFD0:YResolution#={res[1]:g}"]
    r = subprocess.run(args + [os.path.abspath(dst)], capture_output=True, text=True)
    if r.returncode != 0:
        raise Refused(f"exiftool could not write the metadata: {r.stderr.strip()}")


# ---------------------------------------------------------------------------------------------

def check_output(path, kind, expect):
    """The written file, read back: the expected pages with the expected sizes and modes."""
    got = []
    if kind == "png":
        with open(path, "rb") as f:
            head = f.read(29)
        if head[:8] != b"\x89PNG\r\n\x1a\n":
            raise Refused("the written PNG does not read back")
        w, h = struct.unpack(">II", head[16:24])
        got.append((w, h, {0: 1, 4: 2, 2: 3, 6: 4}[head[25]], head[24]))
        # A full decode (zlib and its CRC) proves the file complete.
        with Image.open(path) as im:
            im.load()
    else:
        with tifffile.TiffFile(path) as tif:
            for p in tif.pages:
                got.append((p.imagewidth, p.imagelength, p.samplesperpixel, p.bitspersample))
    want = [(a.shape[1], a.shape[0], a.shape[2], a.dtype.itemsize * 8) for a in expect]
    if got != want:
        raise Refused(f"the written file reads back as {got}, not {want}")


def output_kind(path, fmt):
    """('png' or 'tiff', extension) of a still's output."""
    ext = os.path.splitext(path)[1].lower()
    kind = fmt if fmt != "auto" else ("tiff" if ext in TIFF_EXTS else "png")
    return kind, ((ext if ext in TIFF_EXTS else ".tif") if kind == "tiff" else ".png")


def restore_still(path, out_dir, fmt, props, scale, taken):
    ext = os.path.splitext(path)[1].lower()
    is_tiff = ext in TIFF_EXTS
    meta = exiftool_json(path)
    with tempfile.TemporaryDirectory(prefix=".stills-", dir=out_dir) as tmpdir:
        if is_tiff:
            pages, skipped, compression = read_tiff(path, tmpdir)
        else:
            pages, skipped, compression = [read_other(path, meta)], 0, None
        kind, out_ext = output_kind(path, fmt)
        stem = os.path.splitext(os.path.basename(path))[0]
        if taken[(stem.lower(), out_ext)] > 1:  # a.jpg and a.png: a-jpg.png and a-png.png
            stem = f"{stem}-{ext[1:]}"
        notes, results = [], []
        for page in pages:
            shown = orient(page.pixels, page.orientation)
            restored = restore(to_rgba(shown), props)
            h, w = shown.shape[:2]
            if restored.shape[:2] != (h * scale, w * scale):
                raise Refused(f"dpirrestore gave {restored.shape[1]}x{restored.shape[0]}, "
                              f"not {w * scale}x{h * scale}")
            if isinstance(page.icc, tuple):
                notes.append(f"ICC not carried (a {page.icc[0]} profile; the output is RGB)")
                page.icc = None
            if page.resolution:
                rx, ry, unit = page.resolution
                if page.orientation in (5, 6, 7, 8):
                    rx, ry = ry, rx
                page.resolution = (rx * scale, ry * scale, unit)
            results.append((from_rgba(restored, page.pixels.shape[2]), page))
        turned = sorted({p.orientation for p in pages} - {1})
        if turned:
            notes.insert(0, f"orientation {', '.join(map(str, turned))} applied")
        if skipped:
            notes.append(f"{skipped} reduced-resolution subfile{'s' if skipped > 1 else ''} left out")
        first, page1 = results[0]
        outputs = []  # (final path, temporary path, arrays in it)
        if kind == "tiff":
            tmp = os.path.join(tmpdir, "out" + out_ext)
            comp = TIFF_COMPRESSION.get(compression, "lzw:2")
            write_tiff(tmp, results, comp, tmpdir)
            outputs.append((os.path.join(out_dir, stem + out_ext), tmp, [a for a, _ in results]))
            desc = f"TIFF {TIFF_COMPRESSION_NAME[comp]}"
        else:
            for n, (a, page) in enumerate(results):
                name = stem + (f"-page{n + 1}" if len(results) > 1 else "") + ".png"
                tmp = os.path.join(tmpdir, f"out{n}.png")
                write_png(tmp, a, page.icc, page.resolution)
                outputs.append((os.path.join(out_dir, name), tmp, [a]))
            desc = "PNG"
        for final, tmp, arrays in outputs:
            size = (arrays[0].shape[1], arrays[0].shape[0])
            copy_metadata(path, tmp, meta, size, pages[0].orientation, is_tiff, page1.resolution)
            check_output(tmp, kind, arrays)
        # What the input held and the output now holds, read back (not assumed).
        held, has = fields(meta), fields(exiftool_json(outputs[0][1]))
        had = held - ({"ICC"} if page1.icc is None else set())  # a dropped profile: a note says why
        for final, tmp, _ in outputs:
            os.replace(tmp, final)
    line = " + ".join(f"{a.shape[1]}x{a.shape[0]} {mode_of(a)}" for a, _ in results)
    line += f", {desc}" + (f", {len(results)} pages" if len(results) > 1 else "")
    if not held:
        line += "; no ICC, EXIF, XMP, IPTC or text in the input"
    elif had & has:
        line += f"; carried: {', '.join(sorted(had & has))}"
    if had - has:
        lost = sorted(had - has)
        line += f"; NOT carried: {', '.join(lost)} ({desc.split()[0]} has no place for {'it' if len(lost) == 1 else 'them'})"
    return [o[0] for o in outputs], "; ".join([line] + notes)


def mode_of(a):
    return f"{['gray', 'gray+alpha', 'RGB', 'RGBA'][a.shape[2] - 1]} {a.dtype.itemsize * 8}-bit"


def main(argv):
    fmt = "auto"
    args = []
    it = iter(argv)
    for a in it:
        if a == "--format":
            fmt = next(it, "")
        elif a.startswith("--format="):
            fmt = a.split("=", 1)[1]
        elif a.startswith("--"):
            sys.exit(f"restore-stills: ERROR: unknown option {a} (--format auto|png|tiff)")
        else:
            args.append(a)
    if fmt not in ("auto", "png", "tiff"):
        sys.exit(f"restore-stills: ERROR: --format {fmt or '(nothing)'}: auto, png or tiff")
    if len(args) < 2:
        sys.exit(__doc__)
    in_dir, out_dir, props = args[0], args[1], args[2:]
    for tool in ("exiftool", "tiffcp"):
        if shutil.which(tool) is None:
            sys.exit(f"restore-stills: ERROR: {tool} is missing: run tests/setup-debian.sh "
                     "(Debian libimage-exiftool-perl, libtiff-tools)")
    Gst.init(None)
    scale = check_props(props)
    if not os.path.isdir(in_dir):
        sys.exit(f"restore-stills: ERROR: {in_dir} is not a folder")
    files = sorted(os.path.join(in_dir, f) for f in os.listdir(in_dir)
                   if f.lower().endswith(EXTS) and not f.startswith("."))
    if not files:
        sys.exit(f"restore-stills: no stills ({', '.join(e[1:] for e in EXTS)}) in {in_dir}")
    if os.path.exists(out_dir) and os.path.samefile(in_dir, out_dir):
        sys.exit("restore-stills: ERROR: OUT_DIR is IN_DIR: the outputs would replace the originals")
    os.makedirs(out_dir, exist_ok=True)
    taken = {}  # (stem, output extension) -> how many inputs would write it
    for f in files:
        key = (os.path.splitext(os.path.basename(f))[0].lower(), output_kind(f, fmt)[1])
        taken[key] = taken.get(key, 0) + 1
    failed = []
    for f in files:
        print(f"== {f}", flush=True)
        try:
            written, line = restore_still(f, out_dir, fmt, props, scale, taken)
            print(f"   -> {', '.join(written)} ({line})", flush=True)
        except Refused as e:
            print(f"restore-stills: ERROR: {f}: {e}", file=sys.stderr, flush=True)
            failed.append(f)
        except Exception as e:  # a case not foreseen: still one loud line, and the other files go on
            print(f"restore-stills: ERROR: {f}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            failed.append(f)
    if failed:
        print(f"restore-stills: {len(failed)} of {len(files)} stills failed: {' '.join(failed)}", file=sys.stderr)
        return 1
    print(f"restore-stills: {len(files)} of {len(files)} stills restored into {out_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # the temporary folder is gone by now; finished outputs stay
        sys.exit("restore-stills: interrupted")
