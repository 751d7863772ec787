#!/usr/bin/env python3
"""Held-out compressed video at x1 through the element: how far the output is from the clean frames.

A clean clip (default: the first 50 frames of ../shared/media/bikes.mp4, never trained on) is
compressed with a real codec at a low bitrate (x264enc, GStreamer), decoded, and restored by
`dpirrestore` at scale=1 with each `--fidelity` value. Against the clean frames it prints, per
setting and for the compressed input itself: PSNR (over the whole clip, and the worst frame) and
the temporal error mean |(out_t - out_t-1) - (gt_t - gt_t-1)| (flicker the restoration adds or
removes), plus the ratio of that error to the input's.

Needs numpy (Debian `python3-numpy`), GStreamer with x264enc/avdec_h264 (tests/setup-debian.sh
installs them) and the plugin on GST_PLUGIN_PATH (or --plugin DIR).
Usage: eval_video.py [--clip FILE] [--frames N] [--bitrate KBPS] [--fidelity 0,0.5,1] [--props "..."]
"""
import argparse, os, subprocess, sys, tempfile
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))


def launch(desc):
    r = subprocess.run(["gst-launch-1.0", "-q", *desc.split()], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"gst-launch failed ({desc}):\n{r.stdout}{r.stderr}")


def caps(w, h, fps):
    return f"video/x-raw,format=RGB,width={w},height={h},framerate={fps}"


def frames(path, w, h):
    """Raw RGB frames (GStreamer pads rows to 4 bytes) as float arrays [N, H, W, 3]."""
    stride = (w * 3 + 3) // 4 * 4
    raw = np.fromfile(path, np.uint8)
    n = raw.size // (stride * h)
    return raw[: n * stride * h].reshape(n, h, stride)[:, :, : w * 3].reshape(n, h, w, 3).astype(np.float64)


def psnr(mse):
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip", default=os.path.join(REPO, "..", "shared", "media", "bikes.mp4"))
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--bitrate", type=int, default=150, help="x264enc kbit/s")
    ap.add_argument("--fidelity", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--props", default="", help="more dpirrestore properties (model=..., steps=...)")
    ap.add_argument("--plugin", help="directory holding libgstdpir.so")
    a = ap.parse_args()
    if a.plugin:
        os.environ["GST_PLUGIN_PATH"] = a.plugin
    tmp = tempfile.mkdtemp(prefix="dpir-evalvideo-")
    clean, lq = os.path.join(tmp, "clean.rgb"), os.path.join(tmp, "lq.rgb")
    # Size and rate of the clip, from its first frame's caps.
    r = subprocess.run(["gst-discoverer-1.0", a.clip], capture_output=True, text=True).stdout
    get = lambda key: next(l.split(":", 1)[1].strip() for l in r.splitlines() if l.strip().startswith(key + ":"))
    w, h, fps = int(get("Width")), int(get("Height")), get("Frame rate")
    src = f"filesrc location={a.clip} ! decodebin ! videoconvert ! {caps(w, h, fps)} ! identity eos-after={a.frames}"
    launch(f"{src} ! filesink location={clean}")
    launch(
        f"{src} ! videoconvert ! x264enc bitrate={a.bitrate} speed-preset=medium key-int-max=250 ! "
        f"avdec_h264 ! videoconvert ! {caps(w, h, fps)} ! filesink location={lq}"
    )
    gt = frames(clean, w, h)
    rows = [("compressed input (x264 %d kbit/s)" % a.bitrate, frames(lq, w, h))]
    for f in [float(x) for x in a.fidelity.split(",")]:
        out = os.path.join(tmp, f"out{f}.rgb")
        launch(
            f"filesrc location={lq} ! rawvideoparse format=rgb width={w} height={h} framerate={fps} ! "
            f"dpirrestore scale=1 fidelity={f} {a.props} ! videoconvert ! {caps(w, h, fps)} ! filesink location={out}"
        )
        rows.append((f"dpirrestore fidelity={f}", frames(out, w, h)))
    print(f"{os.path.basename(a.clip)}: {len(gt)} frames {w}x{h}, x264 {a.bitrate} kbit/s, scale=1 {a.props}")
    print(f"| output | PSNR dB | worst frame dB | temporal error | vs input |")
    print(f"|---|---:|---:|---:|---:|")
    dgt = np.diff(gt, axis=0)
    base = None
    for name, x in rows:
        if x.shape != gt.shape:
            sys.exit(f"{name}: {x.shape[0]} frames, expected {gt.shape[0]}: a frame was lost")
        per = ((x - gt) ** 2).mean(axis=(1, 2, 3))
        te = np.abs(np.diff(x, axis=0) - dgt).mean()
        base = base or te
        print(f"| {name} | {psnr(per.mean()):.2f} | {psnr(per.max()):.2f} | {te:.3f} | {te / base:.3f} |")


if __name__ == "__main__":
    main()
