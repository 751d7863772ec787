"""Real codecs through GStreamer (PyGObject), for dpir-nano's training degradations.

codec_roundtrip(frames_u8[N,H,W,3], codec, bpp=..., quality=..., fps=25, rng=None) -> decoded uint8 [N,H,W,3]

One in-process pipeline per call:
  appsrc (RGB) ! videoconvert ! I420 ! <encoder> ! <parser> ! <decoder> ! videoconvert ! RGB ! appsink
with the encoders users actually meet at low bitrates: x264enc (H.264), avenc_mpeg2video (MPEG-2),
vp8enc (VP8), jpegenc (Motion-JPEG, any quality). Bitrates are given in bits per pixel (bpp) so that any
frame size gets the same compression level as the real clip it imitates (bikes-like x264 at 150 kbit/s for
640x272 at 25 frames/s is 0.034 bpp). H, W must be even (I420).

Needs Debian python3-gi + gir1.2-gstreamer-1.0 + gstreamer1.0-{plugins-base,good,ugly,libav} (a venv made with
--system-site-packages from /usr/bin/python3 sees gi).
"""
import numpy as np
import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstApp", "1.0")
from gi.repository import Gst, GstApp  # noqa: E402,F401

Gst.init(None)

CODECS = ("x264", "mpeg2", "mpeg4", "vp8", "jpeg")


def _chain(codec, w, h, fps, bpp, quality, rng):
    kbps = max(4, int(round(bpp * w * h * fps / 1000.0)))
    if codec == "x264":
        preset = ["ultrafast", "veryfast", "faster", "medium"][int(rng.integers(4))] if rng is not None else "medium"
        bf = int(rng.integers(0, 4)) if rng is not None else 0
        return (f"x264enc bitrate={kbps} speed-preset={preset} key-int-max=250 bframes={bf} threads=1 "
                f"! h264parse ! avdec_h264 max-threads=1")
    if codec == "mpeg4":  # MPEG-4 part 2 (DivX/Xvid-era), the same 8x8-DCT block family as MPEG-2
        return (f"avenc_mpeg4 bitrate={kbps * 1000} gop-size=15 max-bframes=0 threads=1 "
                f"! mpeg4videoparse ! avdec_mpeg4 max-threads=1")
    if codec == "vp8":
        return (f"vp8enc target-bitrate={kbps * 1000} deadline=1 cpu-used=8 end-usage=cbr keyframe-max-dist=250 threads=1 "
                f"! vp8dec threads=1")
    if codec == "jpeg":
        return f"jpegenc quality={int(quality)} ! jpegdec"
    raise ValueError(codec)


def _ffmpeg_mpeg2(frames, bpp, fps):
    """MPEG-2 through ffmpeg (imageio-ffmpeg's static binary): GStreamer 1.22's avenc_mpeg2video refuses every
    frame rate here ("MPEG-1/2 does not support 1000000000/1 fps", a gst-libav 1.22 time-base bug), so the MPEG-2
    encode runs in ffmpeg and the decode too (one call each way, raw frames on pipes)."""
    import subprocess
    import imageio_ffmpeg
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    n, h, w, _ = frames.shape
    kbps = max(16, int(round(bpp * w * h * fps / 1000.0)))
    enc = subprocess.run([exe, "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps),
                          "-i", "-", "-c:v", "mpeg2video", "-b:v", f"{kbps}k", "-maxrate", f"{2 * kbps}k",
                          "-bufsize", f"{2 * kbps}k", "-g", "15", "-bf", "0", "-pix_fmt", "yuv420p", "-threads", "1",
                          "-f", "mpeg2video", "-"], input=frames.tobytes(), capture_output=True, check=True)
    dec = subprocess.run([exe, "-loglevel", "error", "-f", "mpegvideo", "-i", "-", "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "-threads", "1", "-"], input=enc.stdout, capture_output=True, check=True)
    out = np.frombuffer(dec.stdout, np.uint8)
    if out.size != frames.size:
        raise RuntimeError(f"mpeg2: {out.size // (h * w * 3)} frames decoded, {n} sent")
    return out.reshape(frames.shape).copy()


def codec_roundtrip(frames, codec, bpp=0.05, quality=50, fps=25, rng=None, timeout_s=20):
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    n, h, w, _ = frames.shape
    assert h % 2 == 0 and w % 2 == 0, "I420 needs even sides"
    if codec == "mpeg2":
        return _ffmpeg_mpeg2(frames, bpp, fps)
    desc = (f"appsrc name=src is-live=false format=time caps=video/x-raw,format=RGB,width={w},height={h},framerate={fps}/1 "
            f"! videoconvert ! video/x-raw,format=I420 ! {_chain(codec, w, h, fps, bpp, quality, rng)} "
            f"! videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false max-buffers=0 emit-signals=false")
    pipe = Gst.parse_launch(desc)
    src, sink = pipe.get_by_name("src"), pipe.get_by_name("sink")
    pipe.set_state(Gst.State.PLAYING)
    dur = Gst.SECOND // fps
    for i in range(n):
        buf = Gst.Buffer.new_wrapped(frames[i].tobytes())
        buf.pts = i * dur
        buf.duration = dur
        src.emit("push-buffer", buf)
    src.emit("end-of-stream")
    out = []
    stride = (w * 3 + 3) // 4 * 4
    while True:
        s = sink.emit("try-pull-sample", timeout_s * Gst.SECOND)
        if s is None:
            break
        b = s.get_buffer()
        ok, mi = b.map(Gst.MapFlags.READ)
        a = np.frombuffer(mi.data, np.uint8)[: stride * h].reshape(h, stride)[:, : w * 3].reshape(h, w, 3).copy()
        b.unmap(mi)
        out.append(a)
    bus = pipe.get_bus()
    msg = bus.pop_filtered(Gst.MessageType.ERROR)
    pipe.set_state(Gst.State.NULL)
    if msg is not None:
        err, dbg = msg.parse_error()
        raise RuntimeError(f"{codec}: {err.message} ({dbg})")
    if len(out) != n:
        raise RuntimeError(f"{codec}: {len(out)} frames decoded, {n} sent")
    return np.stack(out)


def moving_sequence(img_u8, rng, n=6, target=None, max_speed=3.0, margin=12):
    """n frames of a small random pan/shift of img (reflect-padded), frame `target` (default the last) exactly
    aligned with img, so the codec codes it as a P frame with real motion. Integer-pixel motion + small jitter."""
    h, w = img_u8.shape[:2]
    target = n - 1 if target is None else target
    p = np.pad(img_u8, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
    v = rng.uniform(-max_speed, max_speed, 2)
    out = []
    for t in range(n):
        d = v * (t - target) + (rng.normal(0, 0.7, 2) if t != target else 0)
        dy, dx = (int(np.clip(np.round(x), -margin, margin)) for x in d)
        out.append(p[margin + dy: margin + dy + h, margin + dx: margin + dx + w])
    return np.stack(out), target


if __name__ == "__main__":  # quick self-check and timing
    import time
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:128, 0:160]
    img = np.stack([(xx * 1.5) % 256, (yy * 2) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    img = np.clip(img.astype(int) + rng.integers(-30, 30, img.shape), 0, 255).astype(np.uint8)
    for c in CODECS:
        seq, t = moving_sequence(img, rng)
        t0 = time.time()
        out = codec_roundtrip(seq, c, bpp=0.05, quality=30, rng=rng)
        mse = ((out[t].astype(float) - img) ** 2).mean()
        print(c, out.shape, f"{(time.time() - t0) * 1000:.0f} ms", f"PSNR {10 * np.log10(255 ** 2 / mse):.2f}")
