"""Restore a film across Ray workers, scene-aligned, bit-identical to one run, resumable.

Run through pipelines/restore-distributed.sh (it picks the Ray virtual environment):

    pipelines/restore-distributed.sh IN OUT.mkv|OUT.mp4 [dpirrestore properties…] [options]

1. Pre-pass (here, in the driver): the film decoded exactly as pipelines/restore-film.sh decodes
   it, through `dpirrestore analyse-only=true` with the same properties: the element's own scene
   detector finds the clips (no model is loaded). Every frame's timestamps and a CRC of its
   pixels, as the element receives them, are recorded.
2. Clips are grouped into chunks of about --chunk-frames frames. A clip is never split: a clip
   longer than a chunk is a chunk of its own, unless the properties set clip-max-frames=N (then
   the element itself splits it every N frames, in the pre-pass as in any run).
3. Each chunk is a Ray task: the worker decodes the film from an accurate seek to the chunk's
   first frame (checking every frame against the pre-pass CRC), feeds exactly the chunk's frames
   to dpirrestore with first-clip-index set to the chunk's first clip, and encodes the result
   losslessly (FFV1 in Matroska). The segment comes back to the driver, which records it (frame
   count, SHA-256) in the work directory.
4. The driver decodes the segments in order, gives every frame back its original timestamps and
   encodes the film once: the same encoder chain as restore-film.sh (.mkv: FFV1, .mp4: H.264),
   with the source's audio decoded and encoded beside it. OUT is written under a temporary name
   beside it and renamed at the end.

Re-running the same command resumes: recorded segments whose file still has its checksum are
kept, the rest are rendered. A worker lost mid-chunk (killed, node lost) is retried by Ray.
"""

import argparse
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import zlib

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstApp", "1.0")
gi.require_version("GstVideo", "1.0")
gi.require_version("GstPbutils", "1.0")
from gi.repository import GLib, Gst, GstApp, GstPbutils, GstVideo  # noqa: E402

PROG = "restore-distributed"
PLAN_VERSION = 1
# The lossless format of segments and of .mkv output: the element's 8-bit RGB output goes to BGRx
# (with alpha: BGRA), 16-bit to 12-bit GBR(A): what avenc_ffv1 takes. restore-film.sh uses the same.
LOSSLESS_CAPS = "video/x-raw,format={BGRx,BGRA,GBR_12LE,GBRA_12LE}"
# Bytes per pixel of the formats dpirrestore takes (all packed, one plane).
BYTES_PER_PIXEL = {"RGB": 3, "RGBA": 4, "RGBx": 4, "BGRx": 4, "BGRA": 4, "RGBA64_LE": 8}


GI_VERSIONS = {"GLib": "2.0", "Gst": "1.0", "GstApp": "1.0", "GstVideo": "1.0", "GstPbutils": "1.0"}


def import_gi(name):
    """gi.repository.<name> at its version: how a Ray worker gets the modules this file's functions
    use (PyGObject's module proxies cannot be pickled: they are sent by name)."""
    import importlib

    import gi as _gi

    short = name.rsplit(".", 1)[-1]
    _gi.require_version(short, GI_VERSIONS[short])
    return importlib.import_module(f"gi.repository.{short}")


def register_gi_serializers(ray):
    for module in (GLib, Gst, GstApp, GstVideo, GstPbutils):
        ray.util.register_serializer(type(module), serializer=lambda m: m.__name__, deserializer=import_gi)


class Fail(Exception):
    """An error for the user: printed as one line, no traceback."""


# ---- GStreamer helpers (driver and workers) ------------------------------------------------


def gst_init():
    for name in ("GstApp", "GstVideo"):
        import_gi(name)  # their element classes' methods (appsink, appsrc) come with the typelib
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


# ---- Pre-pass ------------------------------------------------------------------------------


def prepass(location, props, say):
    """Frames (timestamps, CRC) and clips as the element sees them, with no model loaded."""
    pipeline = Gst.Pipeline.new("prepass")
    frames, clips = [], []
    caps_in = {}
    restore = restorer(props, ["analyse-only=true"])

    def probe(pad, info):
        buf = info.get_buffer()
        caps = pad.get_current_caps()
        if "caps" not in caps_in:
            caps_in["caps"] = caps.to_string()
        ev = pad.get_sticky_event(Gst.EventType.SEGMENT, 0)
        seg = ev.parse_segment() if ev else None
        pts = buf.pts
        if pts == Gst.CLOCK_TIME_NONE or seg is None:
            caps_in["error"] = f"frame {len(frames)} has no timestamp: chunks cannot be sought"
            return Gst.PadProbeReturn.OK
        frames.append(
            {
                "pts": pts,
                "dur": buf.duration if buf.duration != Gst.CLOCK_TIME_NONE else -1,
                "rt": seg.to_running_time(Gst.Format.TIME, pts),
                "st": seg.to_stream_time(Gst.Format.TIME, pts),
                "crc": frame_crc(buf, caps),
            }
        )
        return Gst.PadProbeReturn.OK

    restore.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, probe)
    decode_head(
        pipeline,
        location,
        lambda: [make("queue", max_size_buffers=4), make("videoconvert"), restore, make("videoconvert"),
                 make("fakesink", sync=False)],
    )
    bus = pipeline.get_bus()
    t0 = last = time.monotonic()
    pipeline.set_state(Gst.State.PLAYING)
    try:
        while True:
            msg = bus.timed_pop(200 * Gst.MSECOND)
            if time.monotonic() - last > 10:
                last = time.monotonic()
                say(f"analysing: {len(frames)} frames…")
            if msg is None:
                continue
            if msg.type == Gst.MessageType.ERROR:
                raise Fail(f"cannot decode {location}: {error_text(msg)}")
            if msg.type == Gst.MessageType.EOS:
                break
            if msg.type == Gst.MessageType.ELEMENT:
                s = msg.get_structure()
                if s is not None and s.get_name() == "dpir-clip":
                    clips.append(
                        {
                            "index": s.get_value("index"),
                            "frame": s.get_value("frame-index"),
                            "reason": s.get_string("reason"),
                        }
                    )
    finally:
        pipeline.set_state(Gst.State.NULL)
    if "error" in caps_in:
        raise Fail(f"{location}: {caps_in['error']}")
    if not frames:
        raise Fail(f"{location}: no video frame could be decoded")
    if any(b["pts"] <= a["pts"] for a, b in zip(frames, frames[1:])):
        raise Fail(f"{location}: frame timestamps are not strictly increasing: chunks cannot be sought")
    if not clips or clips[0]["frame"] != 0:
        raise Fail("the pre-pass found no clip starting at the first frame (dpirrestore too old?)")
    return {"caps_in": caps_in["caps"], "frames": frames, "clips": clips, "seconds": time.monotonic() - t0}


def plan_chunks(n_frames, clips, chunk_frames):
    """Group clips (first frames, ascending) into chunks of about `chunk_frames` frames: a chunk
    takes the next clip while that leaves it nearer to `chunk_frames` than stopping would."""
    starts = [c["frame"] for c in clips] + [n_frames]
    chunks, i = [], 0
    while i < len(clips):
        j = i + 1
        while j < len(clips):
            size, grown = starts[j] - starts[i], starts[j + 1] - starts[i]
            if abs(grown - chunk_frames) < abs(size - chunk_frames):
                j += 1
            else:
                break
        chunks.append(
            {
                "id": len(chunks),
                "first": starts[i],
                "frames": starts[j] - starts[i],
                "first_clip": clips[i]["index"],
                "clips": [dict(c, frame=c["frame"] - starts[i]) for c in clips[i:j]],
            }
        )
        i = j
    return chunks


# ---- The Ray task --------------------------------------------------------------------------


def render_chunk(spec, progress):
    """Render one chunk (runs in a Ray worker). Returns the lossless segment's bytes and facts."""
    os.environ.update(spec["env"])
    gst_init()
    me = f"chunk {spec['id'] + 1}/{spec['chunks']}"
    _, sha = plugin_identity()
    if sha != spec["plugin_sha256"]:
        raise RuntimeError(
            f"{me}: this worker ({socket.gethostname()}) loads another build of libgstdpir.so than the "
            f"driver (sha256 {sha[:12]}… vs {spec['plugin_sha256'][:12]}…): install the same build on every node"
        )
    token = uuid.uuid4().hex
    node = socket.gethostname()
    progress.push.remote(("start", spec["id"], token, os.getpid(), node))
    t0 = time.monotonic()
    frames = spec["frames"]
    n = len(frames)
    caps_in = Gst.Caps.from_string(spec["caps_in"])

    # Leftovers of workers killed mid-chunk on this node.
    tmpdir = tempfile.gettempdir()
    for name in os.listdir(tmpdir):
        m = re.fullmatch(r"gst-dpir-segment-(\d+)-[0-9a-f]+\.mkv", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            try:
                os.unlink(os.path.join(tmpdir, name))
            except OSError:
                pass
    seg_path = os.path.join(tmpdir, f"gst-dpir-segment-{os.getpid()}-{token}.mkv")

    # Encoder: appsrc ! dpirrestore … first-clip-index=N ! videoconvert ! lossless ! FFV1 ! Matroska.
    extra = [f"first-clip-index={spec['first_clip']}"]
    if spec["gpus"]:
        import ray

        ids = [str(int(i)) for i in ray.get_gpu_ids()]
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
        gpu = visible.index(ids[0]) if ids and ids[0] in visible else (int(ids[0]) if ids else 0)
        extra.append(f"device=cuda:{gpu}")
    enc = Gst.Pipeline.new("chunk")
    appsrc = make("appsrc", caps=caps_in, format=Gst.Format.TIME, block=False)
    restore = restorer(spec["props"], extra)
    link_chain(
        enc,
        [appsrc, restore, make("videoconvert"), make("capsfilter", caps=Gst.Caps.from_string(LOSSLESS_CAPS)),
         make("avenc_ffv1"), make("matroskamux"), make("filesink", location=seg_path)],
    )
    restored = [0]
    out_caps = {}

    def count(pad, info):
        restored[0] += 1
        if "caps" not in out_caps:
            out_caps["caps"] = pad.get_current_caps().to_string()
        return Gst.PadProbeReturn.OK

    restore.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, count)
    seen_clips, failure = [], []
    ebus = enc.get_bus()
    ebus.enable_sync_message_emission()

    def on_sync(_bus, msg):
        if msg.type == Gst.MessageType.ERROR:
            failure.append(error_text(msg))
        elif msg.type == Gst.MessageType.ELEMENT:
            s = msg.get_structure()
            if s is not None and s.get_name() == "dpir-clip":
                seen_clips.append(
                    {"index": s.get_value("index"), "frame": s.get_value("frame-index"), "reason": s.get_string("reason")}
                )

    ebus.connect("sync-message", on_sync)

    # Decoder: the restore-film.sh chain up to the element, ending in an appsink with the caps
    # the element had in the pre-pass (the same conversion, hence the same bytes).
    dec = Gst.Pipeline.new("decode")
    appsink = make("appsink", caps=caps_in, sync=False, max_buffers=8, drop=False, enable_last_sample=False)
    decode_head(dec, spec["input"], lambda: [make("queue", max_size_buffers=4), make("videoconvert"), appsink])
    last_report = [0.0]

    def report(force=False):
        now = time.monotonic()
        if force or now - last_report[0] > 0.5:
            last_report[0] = now
            progress.push.remote(("progress", spec["id"], token, restored[0]))

    try:
        if enc.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE or failure:
            raise RuntimeError(f"{me}: the restoring pipeline does not start: {'; '.join(failure) or 'state change failed'}")
        dec.set_state(Gst.State.PAUSED)
        wait_state(dec, f"{me}: decoding {spec['input']}")
        if spec["seek"] is not None:
            # To the frame before the chunk: a decoder clips a frame that straddles the segment
            # start and stamps it with that start, which would then look like the chunk's first
            # frame (container timestamps are rounded: Matroska's to the millisecond).
            ok = dec.seek(1.0, Gst.Format.TIME, Gst.SeekFlags.FLUSH | Gst.SeekFlags.ACCURATE, Gst.SeekType.SET,
                          spec["seek"], Gst.SeekType.NONE, -1)
            if not ok:
                raise RuntimeError(f"{me}: {spec['input']} refused the seek to frame {spec['first']}")
            wait_state(dec, f"{me}: seeking to frame {spec['first']}")
        dec.set_state(Gst.State.PLAYING)
        dbus = dec.get_bus()
        pushed = 0
        while pushed < n:
            if failure:
                raise RuntimeError(f"{me}: {failure[0]}")
            msg = dbus.pop_filtered(Gst.MessageType.ERROR)
            if msg is not None:
                raise RuntimeError(f"{me}: decoding: {error_text(msg)}")
            sample = appsink.try_pull_sample(200 * Gst.MSECOND)
            report()
            if sample is None:
                if appsink.is_eos():
                    raise RuntimeError(f"{me}: the input ended after {pushed} of the chunk's {n} frames")
                continue
            buf = sample.get_buffer()
            want = frames[pushed]
            if buf.pts < want["pts"]:
                continue  # before the chunk (decoded from the keyframe), or the preroll again
            if buf.pts > want["pts"]:
                raise RuntimeError(
                    f"{me}: after the seek the decoder skipped frame {spec['first'] + pushed} "
                    f"(pts {want['pts']}, got {buf.pts}): this input is not frame-exact when sought"
                )
            if frame_crc(buf, sample.get_caps()) != want["crc"]:
                raise RuntimeError(
                    f"{me}: frame {spec['first'] + pushed} decodes differently after a seek than in one pass: "
                    "this input cannot be rendered in chunks bit-identically"
                )
            while appsrc.get_property("current-level-buffers") >= 4 and not failure:
                time.sleep(0.005)
                report()
            appsrc.push_buffer(buf)
            pushed += 1
        dec.set_state(Gst.State.NULL)
        appsrc.end_of_stream()
        while True:
            msg = ebus.timed_pop_filtered(200 * Gst.MSECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR)
            report()
            if failure:
                raise RuntimeError(f"{me}: {failure[0]}")
            if msg is not None and msg.type == Gst.MessageType.EOS:
                break
    finally:
        dec.set_state(Gst.State.NULL)
        enc.set_state(Gst.State.NULL)
    try:
        if restored[0] != n:
            raise RuntimeError(f"{me}: the element gave {restored[0]} frames for the chunk's {n}")
        # The chunk's first clip starts the element's stream ("start"); the others must be the
        # pre-pass's own cuts.
        expected = [dict(c, reason="start") if i == 0 else c for i, c in enumerate(spec["clips"])]
        if seen_clips != expected:
            raise RuntimeError(f"{me}: the element found the clips {seen_clips}, the pre-pass {expected}")
        report(force=True)
        with open(seg_path, "rb") as f:
            data = f.read()
    finally:
        try:
            os.unlink(seg_path)
        except OSError:
            pass
    seconds = time.monotonic() - t0
    return {
        "id": spec["id"],
        "data": data,
        "frames": n,
        "sha256": hashlib.sha256(data).hexdigest(),
        "out_caps": out_caps["caps"],
        "seconds": seconds,
        "pid": os.getpid(),
        "node": node,
    }


# ---- Driver --------------------------------------------------------------------------------


class EventLog:
    """A Ray actor: workers push (kind, chunk, attempt token, …) events, the driver drains them."""

    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def drain(self):
        items, self.items = self.items, []
        return items


def fmt_time(s):
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One bar for the whole film; lines for events above it."""

    def __init__(self, total, done_before, interval):
        self.total, self.before = total, done_before
        self.tty = sys.stdout.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.t0 = None
        self.finished = 0  # frames of chunks finished in this run
        self.running = {}  # chunk id -> (token, frames done)
        self.last = 0.0

    def line(self, text):
        if self.tty:
            sys.stdout.write("\r\033[K")
        print(text, flush=True)
        if self.tty:
            self.draw(force=True)

    def bar(self):
        done_now = self.finished + sum(f for _, f in self.running.values())
        done = min(self.total, self.before + done_now)
        pct = 100.0 * done / max(1, self.total)
        elapsed = time.monotonic() - self.t0 if self.t0 else 0.0
        fps = done_now / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / fps if fps > 0 else None
        width = 30
        fill = int(width * done / max(1, self.total))
        return (
            f"[{'#' * fill}{'-' * (width - fill)}] {done}/{self.total} frames {pct:5.1f}% "
            f"{fps:.2f} frames/s ETA {fmt_time(eta) if eta is not None else '?'}"
            f" ({len(self.running)} chunk{'s' if len(self.running) != 1 else ''} running)"
        )

    def draw(self, force=False):
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        if self.tty:
            sys.stdout.write("\r\033[K" + self.bar())
            sys.stdout.flush()
        else:
            print(self.bar(), flush=True)

    def close(self):
        if self.tty:
            sys.stdout.write("\r\033[K")
        print(self.bar(), flush=True)


def remove_parts(work, keep_dir=False):
    """This program's files in the work directory (and the directory, if nothing else is left)."""
    for name in os.listdir(work):
        if re.fullmatch(r"plan\.json|chunk-\d+\.(mkv|json)(\.tmp-\d+)?", name):
            os.unlink(os.path.join(work, name))
    if not keep_dir and not os.listdir(work):
        os.rmdir(work)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path, data):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise Fail(f"cannot write {path}: {e.strerror}") from None


def connect_ray(args, say):
    """Ray: a private local instance by default; RAY_ADDRESS (Ray's own variable) for a cluster."""
    import ray

    address = os.environ.get("RAY_ADDRESS", "").strip()
    kw = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if address and address != "local":
        if address != "auto":
            m = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?(?::(\d+))?/?", address)
            if not m:
                raise Fail(f"RAY_ADDRESS={address} is not host:port, ray://host:port, auto or local")
            host = m.group(1)
            port = int(m.group(2) or (10001 if address.startswith("ray://") else 6379))
            try:
                socket.create_connection((host, port), timeout=5).close()
            except OSError as e:
                raise Fail(
                    f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({host}:{port}: "
                    f"{e.strerror or e}): is `ray start --head` running there? Unset RAY_ADDRESS for a local Ray"
                ) from None
        done = threading.Event()

        def watchdog():
            if not done.wait(args.connect_timeout):
                print(f"{PROG}: the Ray cluster at RAY_ADDRESS={address} did not answer in "
                      f"{args.connect_timeout} s", file=sys.stderr, flush=True)
                cleanup_and_exit(1)

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            ray.init(address=address, **kw)
        except ConnectionError as e:
            raise Fail(f"cannot connect to the Ray cluster at RAY_ADDRESS={address}: {e}") from None
        finally:
            done.set()
        res = ray.cluster_resources()
        say(f"Ray cluster at {address}: {int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs")
    else:
        ray.init(address="local", num_cpus=args.workers * args.cpus_per_task, **kw)
        res = ray.cluster_resources()
        say(f"local Ray: {args.workers} workers ({int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs)")
    return ray, res


_cleanup = []
# The signal that stopped the run (SIGINT, SIGTERM), if any. Ray's core worker runs Python's signal
# handlers from inside ray.wait/ray.get and can drop the KeyboardInterrupt they raise, so the loop
# and the join also check this flag: an interrupted run never goes on to report success.
_stop = {"signal": None}


def check_interrupted():
    if _stop["signal"] is not None:
        raise KeyboardInterrupt


def cleanup_and_exit(code):
    for f in _cleanup:
        try:
            f()
        except Exception:
            pass
    os._exit(code)


def join(plan, segments, in_path, tmp_out, container, has_audio, say):
    """Decode the segments in order, restore each frame's timestamps, encode the film once."""
    frames = plan["frames"]
    out_caps = Gst.Caps.from_string(plan["out_caps"])
    pipe = Gst.Pipeline.new("join")
    appsrc = make("appsrc", format=Gst.Format.TIME, block=False)
    if container == "mkv":
        tail = [make("videoconvert"), make("capsfilter", caps=Gst.Caps.from_string(LOSSLESS_CAPS)),
                make("avenc_ffv1"), make("queue")]
        mux = make("matroskamux")
        audio_enc = lambda: [make("flacenc")]  # noqa: E731
    else:
        tail = [make("videoconvert"), make("capsfilter", caps=Gst.Caps.from_string("video/x-raw,format=I420")),
                make("x264enc", speed_preset="medium", psy_tune="film"), make("h264parse"), make("queue")]
        mux = make("mp4mux")
        audio_enc = lambda: [make("avenc_aac"), make("aacparse")]  # noqa: E731
    link_chain(pipe, [appsrc, make("videoconvert"), make("capsfilter", caps=out_caps), *tail, mux,
                      make("filesink", location=tmp_out)])
    if has_audio:
        # The source's audio, decoded and encoded as restore-film.sh does, beside the video. The
        # chain and its muxer pad exist before the pipeline starts (the muxer waits for both);
        # decodebin stops at audio, so the video stream is not decoded again.
        chain = [make("queue", max_size_time=0, max_size_buffers=0, max_size_bytes=0),
                 make("audioconvert"), make("audioresample"), *audio_enc(), make("queue")]
        link_chain(pipe, chain)
        if not chain[-1].link(mux):
            raise Fail(f"cannot link the audio encoder to {mux.get_factory().get_name()}")
        src = make("filesrc", location=in_path)
        dec = make("decodebin", caps=Gst.Caps.from_string("audio/x-raw"))
        pipe.add(src)
        pipe.add(dec)
        src.link(dec)
        linked = []

        def pad_added(_d, pad):
            caps = pad.get_current_caps() or pad.query_caps(None)
            if caps.get_structure(0).get_name() == "audio/x-raw" and not linked:
                linked.append(pad)
                pad.link(chain[0].get_static_pad("sink"))
            else:
                sink = make("fakesink", sync=False, **{"async": False})
                pipe.add(sink)
                sink.sync_state_with_parent()
                pad.link(sink.get_static_pad("sink"))

        dec.connect("pad-added", pad_added)

    bus = pipe.get_bus()

    def check():
        msg = bus.pop_filtered(Gst.MessageType.ERROR)
        if msg is not None:
            raise Fail(f"writing {tmp_out}: {error_text(msg)}")

    caps_set = False
    k = 0
    t0 = last = time.monotonic()
    try:
        pipe.set_state(Gst.State.PLAYING)
        for seg in segments:
            rd = Gst.Pipeline.new("segment")
            sink = make("appsink", sync=False, max_buffers=8, drop=False, enable_last_sample=False)
            demux, decoder = make("matroskademux"), make("avdec_ffv1")
            link_chain(rd, [make("filesrc", location=seg["path"]), demux])
            link_chain(rd, [decoder, sink])
            demux.connect("pad-added", lambda _d, pad, dd=decoder: pad.link(dd.get_static_pad("sink")))
            rd.set_state(Gst.State.PLAYING)
            got = 0
            rbus = rd.get_bus()
            try:
                while True:
                    msg = rbus.pop_filtered(Gst.MessageType.ERROR)
                    if msg is not None:
                        raise Fail(f"reading segment {seg['path']}: {error_text(msg)}")
                    sample = sink.try_pull_sample(200 * Gst.MSECOND)
                    check()
                    if sample is None:
                        if sink.is_eos():
                            break
                        continue
                    if not caps_set:
                        appsrc.set_property("caps", sample.get_caps())
                        caps_set = True
                    if got >= seg["frames"]:
                        raise Fail(f"segment {seg['path']} holds more frames than recorded")
                    f = frames[seg["first"] + got]
                    buf = sample.get_buffer().copy()
                    buf.pts = f["rt"]
                    buf.dts = Gst.CLOCK_TIME_NONE
                    buf.duration = f["dur"] if f["dur"] >= 0 else Gst.CLOCK_TIME_NONE
                    while appsrc.get_property("current-level-buffers") >= 8:
                        time.sleep(0.005)
                        check()
                    if appsrc.push_buffer(buf) != Gst.FlowReturn.OK:
                        check()
                        raise Fail(f"writing {tmp_out}: the encoder stopped")
                    got += 1
                    k += 1
                    if time.monotonic() - last > 10:
                        last = time.monotonic()
                        say(f"joining: {k}/{len(frames)} frames")
            finally:
                rd.set_state(Gst.State.NULL)
            if got != seg["frames"]:
                raise Fail(f"segment {seg['path']} holds {got} frames, {seg['frames']} recorded")
        appsrc.end_of_stream()
        while True:
            msg = bus.timed_pop_filtered(Gst.SECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR)
            if msg is None:
                continue
            if msg.type == Gst.MessageType.ERROR:
                raise Fail(f"writing {tmp_out}: {error_text(msg)}")
            break
    finally:
        pipe.set_state(Gst.State.NULL)
    return time.monotonic() - t0


def main(argv):
    ap = argparse.ArgumentParser(
        prog="restore-distributed.sh",
        description="Restore a film across Ray workers: the same frames, bit for bit, as restore-film.sh.",
    )
    ap.add_argument("input", metavar="IN")
    ap.add_argument("output", metavar="OUT", help="OUT.mkv (lossless FFV1) or OUT.mp4 (H.264)")
    ap.add_argument("props", nargs="*", metavar="PROP=VALUE", help="dpirrestore properties, as for restore-film.sh")
    ap.add_argument("--chunk-frames", type=int, default=int(os.environ.get("DPIR_CHUNK_FRAMES", 240)),
                    help="about this many frames per chunk, whole clips (default 240, or $DPIR_CHUNK_FRAMES)")
    ap.add_argument("--workers", type=int, default=int(os.environ.get("DPIR_WORKERS", os.cpu_count() or 1)),
                    help="local Ray only: chunks rendered at once (default: the CPU count, or $DPIR_WORKERS)")
    ap.add_argument("--cpus-per-task", type=int, default=1, help="Ray CPUs a chunk reserves (default 1)")
    ap.add_argument("--gpus-per-task", default="auto",
                    help="0 or 1; auto (default): 1 when the Ray cluster has GPUs and device is not cpu")
    ap.add_argument("--work-dir", help="where segments are kept between runs (default: OUT.parts)")
    ap.add_argument("--keep-parts", action="store_true", help="keep the work directory after success")
    ap.add_argument("--retries", type=int, default=3, help="retries of a chunk whose worker died (default 3)")
    ap.add_argument("--connect-timeout", type=float, default=60, help="seconds to wait for RAY_ADDRESS")
    ap.add_argument("--progress-interval", type=float, default=None,
                    help="seconds between progress bars (default 0.5 on a terminal, else 10)")
    args = ap.parse_intermixed_args(argv)
    for p in args.props:
        if "=" not in p or p.startswith("-"):
            raise Fail(f"{p!r} is not a dpirrestore property (PROP=VALUE)")
    if args.chunk_frames < 1 or args.workers < 1 or args.cpus_per_task < 1:
        raise Fail("--chunk-frames, --workers and --cpus-per-task must be at least 1")
    if args.gpus_per_task not in ("auto", "0", "1"):
        raise Fail("--gpus-per-task is 0, 1 or auto")
    t_start = time.monotonic()
    say = lambda text: print(text, flush=True)  # noqa: E731

    # Arguments, input and output, before anything slow.
    container = os.path.splitext(args.output)[1].lower().lstrip(".")
    if container not in ("mkv", "mp4"):
        raise Fail(f"OUT must end in .mkv (lossless FFV1) or .mp4 (H.264): {args.output!r}")
    gst_init()
    element = restorer(args.props)
    for prop, bad, why in [
        ("analyse-only", True, "the driver runs the analysis itself"),
        ("qos", True, "it drops frames, so chunks would not match"),
        ("tags-as-prompt", True, "tags are not carried into chunks"),
    ]:
        if element.get_property(prop) == bad:
            raise Fail(f"{prop}={str(bad).lower()} is not supported by restore-distributed.sh: {why}")
    device = str(element.get_property("device")).strip().lower()
    in_path = os.path.abspath(args.input)
    if not os.path.isfile(in_path) or not os.access(in_path, os.R_OK):
        raise Fail(f"cannot read the input file {args.input!r}")
    try:
        info = GstPbutils.Discoverer.new(30 * Gst.SECOND).discover_uri(Gst.filename_to_uri(in_path))
    except GLib.Error as e:
        raise Fail(f"{args.input!r} is not a media file GStreamer can read: {e.message}") from None
    if info.get_result() != GstPbutils.DiscovererResult.OK and not info.get_video_streams():
        raise Fail(f"{args.input!r} is not a media file GStreamer can read ({info.get_result().value_nick})")
    if not info.get_video_streams():
        raise Fail(f"{args.input!r} has no video stream")
    has_audio = bool(info.get_audio_streams())
    out_path = os.path.abspath(args.output)
    out_dir = os.path.dirname(out_path)
    if not os.path.isdir(out_dir):
        raise Fail(f"the output directory {out_dir} does not exist")
    tmp_out = os.path.join(out_dir, f".{os.path.basename(out_path)}.part-{os.getpid()}")
    try:
        open(tmp_out, "wb").close()
    except OSError as e:
        raise Fail(f"cannot write in the output directory {out_dir}: {e.strerror}") from None
    _cleanup.append(lambda: os.path.exists(tmp_out) and os.unlink(tmp_out))
    work = os.path.abspath(args.work_dir or out_path + ".parts")
    try:
        os.makedirs(work, exist_ok=True)
    except OSError as e:
        raise Fail(f"cannot create the work directory {work}: {e.strerror}") from None

    def drop_empty_work_dir():
        if os.path.isdir(work) and not os.listdir(work):
            os.rmdir(work)

    _cleanup.append(drop_empty_work_dir)

    # The job's identity: segments of another input, other properties or another build are stale.
    plugin_path, plugin_sha = plugin_identity()
    st = os.stat(in_path)
    key = {"version": PLAN_VERSION, "input": in_path, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "props": args.props, "chunk_frames": args.chunk_frames, "plugin_sha256": plugin_sha}
    plan_path = os.path.join(work, "plan.json")
    plan = None
    if os.path.exists(plan_path):
        try:
            with open(plan_path) as f:
                old = json.load(f)
            if old.get("key") == key:
                plan = old
        except (OSError, ValueError):
            pass
        if plan is None:
            say(f"{work} holds parts of another job (input, properties or plugin changed): starting over")
            remove_parts(work, keep_dir=True)

    # Ray only when there is something to render (a re-run whose chunks are all done just joins);
    # it is reached before the pre-pass, so that a wrong RAY_ADDRESS fails at once.
    ray = resources = None

    def ray_up():
        nonlocal ray, resources
        if ray is None:
            ray, resources = connect_ray(args, say)
            _cleanup.insert(0, ray.shutdown)
            register_gi_serializers(ray)

    resumed = plan is not None
    if plan is None:
        ray_up()
        say(f"analysing {args.input} (scene cuts, no model)…")
        pre = prepass(in_path, args.props, say)
        chunks = plan_chunks(len(pre["frames"]), pre["clips"], args.chunk_frames)
        plan = {"key": key, "caps_in": pre["caps_in"], "frames": pre["frames"], "clips": pre["clips"],
                "chunks": chunks, "out_caps": None}
        write_atomic(plan_path, json.dumps(plan).encode())
        say(f"pre-pass: {len(pre['frames'])} frames, {len(pre['clips'])} clips in {pre['seconds']:.1f} s")
    chunks = plan["chunks"]
    total = len(plan["frames"])
    longest = max(chunks, key=lambda c: c["frames"])
    if longest["frames"] > 1.5 * args.chunk_frames and len(longest["clips"]) == 1:
        say(f"note: chunk {longest['id'] + 1} is one clip of {longest['frames']} frames (longer than "
            f"--chunk-frames={args.chunk_frames}); set clip-max-frames=N in both scripts to split long clips")

    # Resume: a chunk is done when its record and segment agree.
    def seg_paths(c):
        return os.path.join(work, f"chunk-{c['id']:05d}.mkv"), os.path.join(work, f"chunk-{c['id']:05d}.json")

    done, todo = {}, []
    for c in chunks:
        seg, rec = seg_paths(c)
        try:
            with open(rec) as f:
                r = json.load(f)
            if (r["first"], r["frames"]) == (c["first"], c["frames"]) and os.path.getsize(seg) == r["size"] \
                    and sha256_file(seg) == r["sha256"]:
                done[c["id"]] = r
                continue
            say(f"chunk {c['id'] + 1}/{len(chunks)}: segment corrupt (checksum), rendering it again")
        except (OSError, ValueError, KeyError):
            pass
        for p in (seg, rec):
            if os.path.exists(p):
                os.unlink(p)
        todo.append(c)
    frames_before = sum(chunks[i]["frames"] for i in done)
    say(f"{total} frames, {len(plan['clips'])} clips, {len(chunks)} chunks of about {args.chunk_frames} frames"
        + (f"; resuming: {len(done)} chunks already done, {len(todo)} to render" if resumed else ""))

    progress = Progress(total, frames_before, args.progress_interval)
    if todo:
        ray_up()
        if args.gpus_per_task == "auto":
            gpus = 1 if resources.get("GPU", 0) > 0 and device != "cpu" else 0
        else:
            gpus = int(args.gpus_per_task)
        # Workers report to an actor without waiting (a task blocked in ray.get lends its CPU to
        # another task, which would run more chunks at once than asked).
        log = ray.remote(num_cpus=0)(EventLog).remote()
        env = {k: os.environ[k] for k in ("GST_PLUGIN_PATH", "GST_DEBUG", "RAYON_NUM_THREADS", "DPIR_CPU_OPS")
               if k in os.environ}
        task = ray.remote(render_chunk).options(num_cpus=args.cpus_per_task, num_gpus=gpus,
                                                max_retries=args.retries, retry_exceptions=False)
        pending = {}
        for c in todo:
            spec = {"id": c["id"], "chunks": len(chunks), "input": in_path, "caps_in": plan["caps_in"],
                    "props": args.props, "first": c["first"], "first_clip": c["first_clip"],
                    "seek": plan["frames"][c["first"] - 1]["st"] if c["first"] > 0 else None,
                    "frames": plan["frames"][c["first"]:c["first"] + c["frames"]], "clips": c["clips"],
                    "gpus": gpus, "env": env, "plugin_sha256": plugin_sha}
            pending[task.remote(spec, log)] = c
        attempts = {}
        progress.t0 = time.monotonic()
        while pending:
            check_interrupted()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ev in ray.get(log.drain.remote()):
                kind, cid, token = ev[0], ev[1], ev[2]
                c = chunks[cid]
                if cid in done:
                    continue  # a report that arrived after the result
                if kind == "start":
                    attempts[cid] = attempts.get(cid, 0) + 1
                    progress.running[cid] = (token, 0)
                    what = "started" if attempts[cid] == 1 else f"restarted (attempt {attempts[cid]}: its worker was lost)"
                    progress.line(f"chunk {cid + 1}/{len(chunks)}: {what}, frames {c['first']}-{c['first'] + c['frames'] - 1}"
                                  f" (pid {ev[3]} on {ev[4]})")
                elif kind == "progress" and cid in progress.running and progress.running[cid][0] == token:
                    progress.running[cid] = (token, ev[3])
            for ref in ready:
                c = pending.pop(ref)
                try:
                    r = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    raise Fail(str(cause) if cause is not None else str(e).strip().splitlines()[-1]) from None
                except ray.exceptions.RayError as e:
                    raise Fail(f"chunk {c['id'] + 1}/{len(chunks)} failed after {args.retries} retries: "
                               f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") from None
                seg, rec = seg_paths(c)
                write_atomic(seg, r.pop("data"))
                r.update(first=c["first"], size=os.path.getsize(seg))
                write_atomic(rec, json.dumps(r).encode())
                done[c["id"]] = r
                progress.running.pop(c["id"], None)
                progress.finished += c["frames"]
                progress.line(f"chunk {c['id'] + 1}/{len(chunks)} done: frames {c['first']}-{c['first'] + c['frames'] - 1} "
                              f"({c['frames']} frames, clips {c['first_clip']}-{c['first_clip'] + len(c['clips']) - 1}) "
                              f"in {r['seconds']:.1f} s, {c['frames'] / max(r['seconds'], 1e-9):.2f} frames/s "
                              f"(pid {r['pid']} on {r['node']})")
            progress.draw()
        progress.close()
    rendered = len(todo)
    check_interrupted()

    out_caps = {done[c["id"]]["out_caps"] for c in chunks}
    if len(out_caps) != 1:
        raise Fail(f"the chunks' segments disagree on their format: {sorted(out_caps)}")
    plan["out_caps"] = out_caps.pop()
    segments = [{"path": seg_paths(c)[0], "first": c["first"], "frames": c["frames"]} for c in chunks]
    say(f"joining {len(chunks)} segments into {args.output}" + (" with the source's audio" if has_audio else ""))
    join_s = join(plan, segments, in_path, tmp_out, container, has_audio, say)
    check_interrupted()  # tmp_out is removed by the cleanup: no output
    os.replace(tmp_out, out_path)
    if not args.keep_parts:
        remove_parts(work)
    say(f"done: {args.output}, {total} frames in {len(chunks)} chunks ({rendered} rendered, "
        f"{len(chunks) - rendered} resumed), joined in {join_s:.1f} s, {time.monotonic() - t_start:.1f} s in all")


def entry():
    def on_signal(sig, _frame):
        _stop["signal"] = sig
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        main(sys.argv[1:])
    except Fail as e:
        print(f"{PROG}: {e}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished chunks are kept: run the same command again to resume",
              file=sys.stderr, flush=True)
        code = 130
    except Exception:
        import traceback

        # Ray may have replaced sys.stderr by then: write to the file descriptor.
        os.write(2, f"{PROG}: internal error:\n{traceback.format_exc()}".encode())
        code = 2
    finally:
        for f in _cleanup:
            try:
                f()
            except Exception:
                pass
    sys.exit(code)


if __name__ == "__main__":
    entry()
