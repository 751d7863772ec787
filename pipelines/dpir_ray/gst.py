"""GStreamer helpers shared by the driver (pre-pass, join) and the workers."""

import hashlib
import os
import time
import zlib

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstApp", "1.0")
gi.require_version("GstVideo", "1.0")
gi.require_version("GstPbutils", "1.0")
from gi.repository import GLib, Gst, GstApp, GstPbutils, GstVideo  # noqa: E402,F401 (GstApp: appsrc/appsink methods)

from .plan import Fail  # noqa: E402

# The lossless format of .mkv output: the element's 8-bit RGB output goes to BGRx (with alpha:
# BGRA), 16-bit to 12-bit GBR(A): what avenc_ffv1 takes. restore-film.sh uses the same.
LOSSLESS_CAPS = "video/x-raw,format={BGRx,BGRA,GBR_12LE,GBRA_12LE}"
# Bytes per pixel of the formats dpirrestore takes (all packed, one plane).
BYTES_PER_PIXEL = {"RGB": 3, "RGBA": 4, "RGBx": 4, "BGRx": 4, "BGRA": 4, "RGBA64_LE": 8, "RGB10A2_LE": 4,
                   "BGR10A2_LE": 4}


def gst_init():
    if not Gst.is_initialized():
        Gst.init(None)
    if Gst.ElementFactory.find("dpirrestore") is None:
        raise Fail(
            "GStreamer has no dpirrestore element: build the plugin (cargo build --release) and "
            "point GST_PLUGIN_PATH at the folder holding libgstdpir.so"
        )


_plugin_sha = {}


def plugin_identity():
    """Path and SHA-256 of the libgstdpir.so GStreamer loads (segments of another build differ);
    hashed once per process and file version (a debug build is a few hundred MB)."""
    plugin = Gst.Registry.get().find_plugin("dpir")
    path = plugin.get_filename() if plugin else None
    if not path:
        return None, "static"
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _plugin_sha:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _plugin_sha[key] = h.hexdigest()
    return path, _plugin_sha[key]


def make(factory, **props):
    e = Gst.ElementFactory.make(factory, None)
    if e is None:
        raise Fail(f"GStreamer element {factory} is missing (tests/setup-debian.sh installs the plugins)")
    for k, v in props.items():
        e.set_property(k.replace("_", "-"), v)
    return e


def restorer(props, extra=()):
    """A dpirrestore element with gst-launch style `key=value` properties (as restore-film.sh)."""
    try:
        return Gst.parse_launchv(["dpirrestore", *props, *extra])
    except GLib.Error as e:
        raise Fail(f"dpirrestore properties {' '.join(props)!r}: {e.message}") from None


def link_chain(bin_, elements):
    for e in elements:
        bin_.add(e)
    for a, b in zip(elements, elements[1:]):
        if not a.link(b):
            raise Fail(f"cannot link {a.get_name()} to {b.get_name()}")


def error_text(msg):
    err, dbg = msg.parse_error()
    src = msg.src.get_name() if msg.src else "pipeline"
    text = f"{src}: {err.message}"
    if dbg:
        # The last line of GStreamer's debug string names the cause (errno text and the like).
        text += f" ({dbg.strip().splitlines()[-1]})"
    return text


def video_encoder(kind):
    """The encoder chain of a segment (after dpirrestore), ending in its parsed encoded stream:
    restore-film.sh's for .mkv (FFV1), and for .mp4 its x264 settings at constant quality."""
    if kind["codec"] == "ffv1":
        return [make("videoconvert"), make("capsfilter", caps=Gst.Caps.from_string(LOSSLESS_CAPS)),
                make("avenc_ffv1")]
    enc = make("x264enc")
    for k, v in kind["x264"].items():
        Gst.util_set_object_arg(enc, k, v)
    enc.set_property("quantizer", int(kind["crf"]))
    return [make("videoconvert"), make("capsfilter", caps=Gst.Caps.from_string("video/x-raw,format=I420")),
            enc, make("h264parse")]


def muxer(container):
    return make("matroskamux") if container == "mkv" else make("mp4mux")


def audio_encoder(container):
    """restore-film.sh's audio chain: FLAC in .mkv, AAC in .mp4."""
    return [make("flacenc")] if container == "mkv" else [make("avenc_aac"), make("aacparse")]


def decode_head(pipeline, location, on_video, audio=None):
    """filesrc ! decodebin: the first raw video pad goes to `on_video()`'s first element through
    `video/x-raw` (as `dec. ! video/x-raw ! …` in restore-film.sh); an audio pad to `audio()`'s
    first element if given; every other pad to a fakesink."""
    src = make("filesrc", location=location)
    dec = make("decodebin")
    pipeline.add(src)
    pipeline.add(dec)
    src.link(dec)
    state = {"video": False, "audio": False}

    def sink_for(chain):
        for e in chain:
            pipeline.add(e)
        for a, b in zip(chain, chain[1:]):
            a.link(b)
        for e in reversed(chain):
            e.sync_state_with_parent()
        return chain[0].get_static_pad("sink")

    def pad_added(_dec, pad):
        caps = pad.get_current_caps() or pad.query_caps(None)
        name = caps.get_structure(0).get_name() if caps and caps.get_size() else ""
        if name == "video/x-raw" and not state["video"]:
            state["video"] = True
            target = sink_for([make("capsfilter", caps=Gst.Caps.from_string("video/x-raw"))] + on_video())
        elif name == "audio/x-raw" and audio and not state["audio"]:
            state["audio"] = True
            target = sink_for(audio())
        else:
            target = sink_for([make("fakesink", sync=False, **{"async": False})])
        pad.link(target)

    dec.connect("pad-added", pad_added)
    return dec


def frame_crc(buf, caps):
    """CRC-32 of a frame's pixel rows (padding excluded: its bytes are not defined)."""
    s = caps.get_structure(0)
    fmt, width, height = s.get_string("format"), s.get_value("width"), s.get_value("height")
    if fmt not in BYTES_PER_PIXEL:
        raise Fail(f"dpirrestore took frames in {fmt}, which restore-distributed.sh cannot check")
    row = width * BYTES_PER_PIXEL[fmt]
    meta = GstVideo.buffer_get_video_meta(buf)
    if meta is not None:
        stride, offset = meta.stride[0], meta.offset[0]
    else:
        stride, offset = (row + 3) & ~3, 0
    ok, info = buf.map(Gst.MapFlags.READ)
    if not ok:
        raise RuntimeError("cannot map a video frame")
    try:
        data = memoryview(info.data)
        crc = 0
        for y in range(height):
            start = offset + y * stride
            crc = zlib.crc32(data[start : start + row], crc)
        return crc
    finally:
        buf.unmap(info)


def wait_state(pipeline, what, timeout_s=120):
    """Wait for ASYNC_DONE after a state change or a flushing seek; raise on ERROR."""
    bus = pipeline.get_bus()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = bus.timed_pop_filtered(100 * Gst.MSECOND, Gst.MessageType.ASYNC_DONE | Gst.MessageType.ERROR)
        if msg is None:
            continue
        if msg.type == Gst.MessageType.ERROR:
            raise RuntimeError(f"{what}: {error_text(msg)}")
        return
    raise RuntimeError(f"{what}: timed out after {timeout_s} s")


def discover(path):
    """(has video, has audio) of a media file; Fail when GStreamer cannot read it."""
    try:
        info = GstPbutils.Discoverer.new(30 * Gst.SECOND).discover_uri(Gst.filename_to_uri(path))
    except GLib.Error as e:
        raise Fail(f"{path!r} is not a media file GStreamer can read: {e.message}") from None
    if info.get_result() != GstPbutils.DiscovererResult.OK and not info.get_video_streams():
        raise Fail(f"{path!r} is not a media file GStreamer can read ({info.get_result().value_nick})")
    return bool(info.get_video_streams()), bool(info.get_audio_streams())
