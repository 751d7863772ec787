"""The work restore-distributed.sh's driver does itself, at 1080p, timed: the pre-pass (decode once
through `dpirrestore analyse-only=true`, CRC of every frame) and the join of the chunks' segments
(demux and mux, no decoding), against the previous driver's join (decode every segment and encode
the film once), on the same segments. Extrapolated to an hour of film at 24 frames/s.

    GST_PLUGIN_PATH=$CARGO_TARGET_DIR/release ~/.cache/gst-dpir-ray-venv/bin/python \\
        benches/distributed_driver.py [--frames 144] [--chunk-frames 48] [--size 1920x1080] [--snow]

(KEEP=1 keeps its temporary folder, printed as /tmp/dpir-driver-bench-*, for a look at the files.)

The 1080p film is the 1906 film (DPIR_MEDIA) scaled up (or, with --snow, random pixels: the
most bytes a frame, as no codec compresses them: then FFV1), H.264 at CRF 18 with a sine audio track;
the segments are made by the workers' encoder chains (FFV1 for .mkv, x264 for .mp4) from its
frames, without the model (restoring is the workers' work, not the driver's). Upscaled archive
footage compresses better than native 1080p: the bytes per frame are printed beside the times.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pipelines"))

from dpir_ray import plan as planning  # noqa: E402
from dpir_ray.gst import (Gst, audio_encoder, gst_init, link_chain, make, video_encoder,  # noqa: E402
                          LOSSLESS_CAPS)
from dpir_ray.join import encode_once, join  # noqa: E402
from dpir_ray.prepass import prepass  # noqa: E402

HOUR_FRAMES = 24 * 3600


def run(pipe, what):
    pipe.set_state(Gst.State.PLAYING)
    msg = pipe.get_bus().timed_pop_filtered(Gst.CLOCK_TIME_NONE, Gst.MessageType.EOS | Gst.MessageType.ERROR)
    pipe.set_state(Gst.State.NULL)
    if msg.type == Gst.MessageType.ERROR:
        raise SystemExit(f"{what}: {msg.parse_error()[0].message}")


def make_source(path, frames, width, height, snow):
    media = os.environ.get("DPIR_MEDIA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "media"))
    film = os.path.join(media, "Shepard_Calais_1906_FrenchGP.ogv")
    head = (f"videotestsrc pattern=snow ! video/x-raw,width={width},height={height},framerate=24/1" if snow
            else f"filesrc location={film} ! decodebin")
    desc = (f"{head} ! videoconvert ! videoscale ! "
            f"video/x-raw,width={width},height={height},pixel-aspect-ratio=1/1 ! videoconvert ! video/x-raw,format=I420 ! "
            f"identity eos-after={frames + 1} ! "  # it ends the stream at (not after) that buffer
            + ("avenc_ffv1" if snow else "x264enc speed-preset=medium pass=qual quantizer=18 ! h264parse")
            + " ! queue ! matroskamux name=m ! "
            f"filesink location={path} audiotestsrc wave=sine freq=330 volume=0.3 "
            f"num-buffers={frames * 2} samplesperbuffer=1000 ! audio/x-raw,rate=48000,channels=2 ! "
            f"audioconvert ! flacenc ! queue ! m.")
    run(Gst.parse_launch(desc), "making the 1080p film")


def decoded(path, caps):
    pipe = Gst.Pipeline.new("decode")
    sink = make("appsink", caps=Gst.Caps.from_string(caps), sync=False)
    src, dec = make("filesrc", location=path), make("decodebin")
    pipe.add(src)
    pipe.add(dec)
    src.link(dec)
    chain = [make("queue"), make("videoconvert"), sink]
    link_chain(pipe, chain)

    def pad_added(_d, pad):
        if pad.query_caps(None).get_structure(0).get_name() == "video/x-raw" and not chain[0].get_static_pad("sink").is_linked():
            pad.link(chain[0].get_static_pad("sink"))
        else:
            fake = make("fakesink", sync=False, **{"async": False})
            pipe.add(fake)
            fake.sync_state_with_parent()
            pad.link(fake.get_static_pad("sink"))

    dec.connect("pad-added", pad_added)
    pipe.set_state(Gst.State.PLAYING)
    while True:
        s = sink.try_pull_sample(10 * Gst.SECOND)
        if s is None:
            break
        yield s
    pipe.set_state(Gst.State.NULL)


def make_segments(src, plan, kind, container, work):
    """The workers' encoder chains, fed the film's frames with their running times."""
    caps_in = plan["caps_in"]
    frames = iter(decoded(src, caps_in))
    paths = []
    for c in plan["chunks"]:
        path = os.path.join(work, planning.segment_file(c["id"], kind))
        pipe = Gst.Pipeline.new("segment")
        appsrc = make("appsrc", caps=Gst.Caps.from_string(caps_in), format=Gst.Format.TIME, block=True,
                      max_buffers=4)
        link_chain(pipe, [appsrc, make("queue"), *video_encoder(kind), make("matroskamux"),
                          make("filesink", location=path)])
        pipe.set_state(Gst.State.PLAYING)
        for f in plan["frames"][c["first"]:c["first"] + c["frames"]]:
            buf = next(frames).get_buffer().copy()
            buf.pts, buf.dts, buf.duration = f["rt"], Gst.CLOCK_TIME_NONE, f["dur"]
            appsrc.push_buffer(buf)
        appsrc.end_of_stream()
        msg = pipe.get_bus().timed_pop_filtered(Gst.CLOCK_TIME_NONE, Gst.MessageType.EOS | Gst.MessageType.ERROR)
        pipe.set_state(Gst.State.NULL)
        if msg.type == Gst.MessageType.ERROR:
            raise SystemExit(f"segment {path}: {msg.parse_error()[0].message}")
        paths.append({"path": path, "first": c["first"], "frames": c["frames"]})
    return paths


def reencode_mkv(src, segments, out):
    """The previous driver's .mkv join: decode every FFV1 segment, encode the film once in FFV1, with
    the source's audio."""
    desc = (f"splitmuxsrc location={os.path.dirname(segments[0]['path'])}/chunk-*.ffv1.mkv ! decodebin ! queue ! "
            f"videoconvert ! {LOSSLESS_CAPS} ! avenc_ffv1 ! queue ! matroskamux name=m ! filesink location={out} "
            f"filesrc location={src} ! decodebin ! audio/x-raw ! queue ! audioconvert ! audioresample ! "
            f"{' ! '.join(e.get_factory().get_name() for e in audio_encoder('mkv'))} ! queue ! m.")
    t0 = time.monotonic()
    run(Gst.parse_launch(desc), "the decode-and-encode join")
    return time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=144)
    ap.add_argument("--chunk-frames", type=int, default=48)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--snow", action="store_true",
                    help="random pixels instead of the film: the most bytes per frame (the worst case of I/O)")
    args = ap.parse_args()
    width, height = (int(x) for x in args.size.split("x"))
    gst_init()
    tmp = tempfile.mkdtemp(prefix="dpir-driver-bench-")
    try:
        print(f"load average before: {open('/proc/loadavg').read().split()[:3]}")
        src = os.path.join(tmp, "film-1080p.mkv")
        make_source(src, args.frames, width, height, args.snow)
        t0 = time.monotonic()
        pre = prepass(src, [], print)
        pre_s = time.monotonic() - t0
        n = len(pre["frames"])
        # Chunks every --chunk-frames frames, as clip-max-frames would split the film.
        clips = [{"index": i, "frame": f, "reason": "bench"} for i, f in enumerate(range(0, n, args.chunk_frames))]
        plan = {"caps_in": pre["caps_in"], "frames": pre["frames"], "clips": clips,
                "chunks": planning.plan_chunks(n, clips, args.chunk_frames)}
        print(f"{n} frames of {width}x{height}, {len(plan['chunks'])} chunks")
        print(f"pre-pass: {pre_s:.2f} s, {1000 * pre_s / n:.1f} ms a frame, "
              f"{pre_s / n * HOUR_FRAMES / 60:.0f} min per hour of film at 24 frames/s")
        segments, seg_bytes = {}, {}
        for container in ("mkv", "mp4"):
            kind = planning.segment_kind(container)
            work = os.path.join(tmp, container)
            os.makedirs(work)
            segments[container] = make_segments(src, plan, kind, container, work)
            seg_bytes[container] = sum(os.path.getsize(s["path"]) for s in segments[container])
        per_hour = lambda s: s / n * HOUR_FRAMES / 60  # noqa: E731
        for container in ("mkv", "mp4"):
            kind = planning.segment_kind(container)
            new_s, _ = join(plan, segments[container], src, os.path.join(tmp, f"joined.{container}"), container,
                            kind, True, print)
            # The same without the audio: what the video's bytes cost (the audio branch reads the
            # whole source file, as large as the film's source is).
            video_s, _ = join(plan, segments[container], src, os.path.join(tmp, f"video-only.{container}"),
                              container, kind, False, print)
            # Before: the previous driver decoded the (FFV1) segments and encoded the film once.
            if container == "mkv":
                old_s = reencode_mkv(src, segments["mkv"], os.path.join(tmp, "reencoded.mkv"))
            else:
                old_s, _ = encode_once(plan, segments["mkv"], src, os.path.join(tmp, "reencoded.mp4"), kind, True,
                                       print, plan["caps_in"])
            print(f"{container} ({kind['codec']} segments, {seg_bytes[container] / n / 1e6:.2f} MB a frame): "
                  f"join without decoding {new_s:.2f} s ({1000 * new_s / n:.1f} ms a frame, "
                  f"{per_hour(new_s):.1f} min per hour of film; video alone {1000 * video_s / n:.1f} ms a frame, "
                  f"{per_hour(video_s):.1f} min per hour); decode and encode once {old_s:.2f} s "
                  f"({1000 * old_s / n:.1f} ms a frame, {per_hour(old_s):.0f} min per hour)")
        print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    finally:
        if not os.environ.get('KEEP'):
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
