"""The work restore-distributed.sh's driver does itself, at 1080p, timed: the pre-pass (decode once
through `dpirrestore analyse-only=true`, CRC of every frame) and the join of the chunks' segments
(demux and mux, no decoding), against the previous driver's join (decode every segment and encode
the film once), on the same segments. Extrapolated to an hour of film at 24 frames/s.

    GST_PLUGIN_PATH=$CARGO_TARGET_DIR/release ~/.cache/gst-dpir-ray-venv/bin/python \\
        benches/distributed_driver.py [--frames 144] [--chunk-frames 48] [--size 1920x1080]

The 1080p film is the 1906 film (DPIR_MEDIA) scaled up, H.264 at CRF 18 with a sine audio track;
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
from dpir_ray.gst import (Gst, audio_encoder, gst_init, link_chain, make, muxer, video_encoder,  # noqa: E402
                          LOSSLESS_CAPS)
from dpir_ray.join import join  # noqa: E402
from dpir_ray.prepass import prepass  # noqa: E402

HOUR_FRAMES = 24 * 3600


def run(pipe, what):
    pipe.set_state(Gst.State.PLAYING)
    msg = pipe.get_bus().timed_pop_filtered(Gst.CLOCK_TIME_NONE, Gst.MessageType.EOS | Gst.MessageType.ERROR)
    pipe.set_state(Gst.State.NULL)
    if msg.type == Gst.MessageType.ERROR:
        raise SystemExit(f"{what}: {msg.parse_error()[0].message}")


def make_source(path, frames, width, height):
    media = os.environ.get("DPIR_MEDIA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "media"))
    film = os.path.join(media, "Shepard_Calais_1906_FrenchGP.ogv")
    desc = (f"filesrc location={film} ! decodebin ! videoconvert ! videoscale ! "
            f"video/x-raw,width={width},height={height},pixel-aspect-ratio=1/1 ! identity eos-after={frames + 1} ! "
            f"x264enc speed-preset=medium pass=qual quantizer=18 ! h264parse ! queue ! matroskamux name=m ! "
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
        link_chain(pipe, [appsrc, make("queue"), *video_encoder(kind), muxer(container),
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


def old_join(src, segments, container, out, kind):
    """The previous driver's join: decode every segment, encode the film once (restore-film.sh's
    encoder chain), with the source's audio."""
    if container == "mkv":
        venc = f"videoconvert ! {LOSSLESS_CAPS} ! avenc_ffv1"
    else:
        venc = ("videoconvert ! video/x-raw,format=I420 ! x264enc speed-preset=medium psy-tune=film "
                f"pass=qual quantizer={kind['crf']} ! h264parse")
    aenc = " ! ".join(e.get_factory().get_name() for e in audio_encoder(container))
    desc = (f"splitmuxsrc location={os.path.dirname(segments[0]['path'])}/chunk-*.{kind['name']}.{kind['ext']} "
            f"! decodebin ! queue ! {venc} ! queue ! {'matroskamux' if container == 'mkv' else 'mp4mux'} name=m ! "
            f"filesink location={out} filesrc location={src} ! decodebin ! audio/x-raw ! queue ! audioconvert ! "
            f"audioresample ! {aenc} ! queue ! m.")
    t0 = time.monotonic()
    run(Gst.parse_launch(desc), "the decode-and-encode join")
    return time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=144)
    ap.add_argument("--chunk-frames", type=int, default=48)
    ap.add_argument("--size", default="1920x1080")
    args = ap.parse_args()
    width, height = (int(x) for x in args.size.split("x"))
    gst_init()
    tmp = tempfile.mkdtemp(prefix="dpir-driver-bench-")
    try:
        print(f"load average before: {open('/proc/loadavg').read().split()[:3]}")
        src = os.path.join(tmp, "film-1080p.mkv")
        make_source(src, args.frames, width, height)
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
        for container in ("mkv", "mp4"):
            kind = planning.segment_kind(container)
            work = os.path.join(tmp, container)
            os.makedirs(work)
            segments = make_segments(src, plan, kind, container, work)
            seg_bytes = sum(os.path.getsize(s["path"]) for s in segments)
            out = os.path.join(tmp, f"joined.{container}")
            new_s, video_bytes = join(plan, segments, src, out, container, kind, True, print)
            old_s = old_join(src, segments, container, os.path.join(tmp, f"reencoded.{container}"), kind)
            print(f"{container} ({kind['codec']}, {seg_bytes / n / 1e6:.2f} MB a frame): join without decoding "
                  f"{new_s:.2f} s ({1000 * new_s / n:.1f} ms a frame, {new_s / n * HOUR_FRAMES / 60:.1f} min per "
                  f"hour of film); decode and encode once {old_s:.2f} s ({1000 * old_s / n:.1f} ms a frame, "
                  f"{old_s / n * HOUR_FRAMES / 60:.0f} min per hour)")
        print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
