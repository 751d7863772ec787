"""Archival-style random degradations (Real-ESRGAN-like second-order mixes) for dpir-nano.

degrade(hq_uint8[H,W,3], rng, scale) -> (lq_small_uint8[H/scale,W/scale,3], lq_up_uint8[H,W,3])

lq_up is what the plugin feeds the model: the degraded LQ frame upsampled to the output size with
PIL-style bicubic on 8-bit values (src/engine/dpir.rs does the same), so train and inference agree.
Validation uses `rng = np.random.default_rng([seed, index])` (fixed-seed mode, see `fixed_rng`).
"""
import io
import numpy as np
from PIL import Image, ImageFilter


def fixed_rng(seed, index):
    return np.random.default_rng([int(seed), int(index)])


def _gauss_kernel(rng, sigma_range=(0.2, 2.0), aniso_p=0.3):
    sx = rng.uniform(*sigma_range)
    if rng.random() < aniso_p:
        sy = rng.uniform(*sigma_range); th = rng.uniform(0, np.pi)
    else:
        sy = sx; th = 0.0
    r = int(np.ceil(3 * max(sx, sy)))
    r = max(1, min(r, 10))
    y, x = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    c, s = np.cos(th), np.sin(th)
    xr = c * x + s * y; yr = -s * x + c * y
    k = np.exp(-0.5 * (xr ** 2 / sx ** 2 + yr ** 2 / sy ** 2))
    return k / k.sum()


def _conv(img, k):
    """img float [H,W,3], k [kh,kw] -> reflect-padded 2-D convolution (separable-free, small kernels)."""
    r = k.shape[0] // 2
    p = np.pad(img, ((r, r), (r, r), (0, 0)), mode="reflect")
    out = np.zeros_like(img)
    H, W = img.shape[:2]
    for dy in range(k.shape[0]):
        for dx in range(k.shape[1]):
            w = k[dy, dx]
            if w > 1e-6:
                out += w * p[dy:dy + H, dx:dx + W]
    return out


def _blur(img, rng, sigma_range):
    return _conv(img, _gauss_kernel(rng, sigma_range))


def _noise(img, rng, sigma_range=(1, 20), gray_p=0.4, poisson_p=0.3):
    if rng.random() < poisson_p:
        scale = 10 ** rng.uniform(1.5, 3.0)  # photons per unit
        if rng.random() < gray_p:
            lum = img.mean(axis=2, keepdims=True)
            n = rng.poisson(np.clip(lum, 0, 1) * scale) / scale - lum
            return img + n
        return rng.poisson(np.clip(img, 0, 1) * scale) / scale
    s = rng.uniform(*sigma_range) / 255.0
    if rng.random() < gray_p:
        n = rng.normal(0, s, img.shape[:2])[..., None]
    else:
        n = rng.normal(0, s, img.shape)
    return img + n


def _film_grain(img, rng):
    H, W = img.shape[:2]
    g = rng.uniform(1.0, 2.5)  # grain size in pixels
    h2, w2 = max(2, int(H / g)), max(2, int(W / g))
    n = rng.normal(0, 1, (h2, w2)).astype(np.float32)
    n = np.asarray(Image.fromarray(n, mode="F").resize((W, H), Image.BILINEAR))
    n = n / (n.std() + 1e-6)
    amp = rng.uniform(0.01, 0.06)
    lum = img.mean(axis=2, keepdims=True)
    w = 4 * np.clip(lum, 0, 1) * (1 - np.clip(lum, 0, 1))  # strongest in the mid-tones
    return img + amp * (0.5 + w) * n[..., None]


def _jpeg(img, rng, q_range=(30, 95)):
    q = int(rng.integers(q_range[0], q_range[1] + 1))
    u8 = Image.fromarray(np.clip(np.round(img * 255), 0, 255).astype(np.uint8))
    b = io.BytesIO(); u8.save(b, format="JPEG", quality=q, subsampling=int(rng.integers(0, 3)))
    return np.asarray(Image.open(io.BytesIO(b.getvalue())).convert("RGB")).astype(np.float64) / 255.0


def _fade(img, rng):
    """Archival fading / colour cast: lower contrast, lifted blacks, a tint, a little desaturation."""
    c = rng.uniform(0.7, 1.0)
    lift = rng.uniform(0.0, 0.08)
    tint = rng.normal(0, 0.03, 3)
    sat = rng.uniform(0.6, 1.0)
    lum = img.mean(axis=2, keepdims=True)
    img = lum + sat * (img - lum)
    return img * c + lift + tint + (1 - c) * 0.5 * rng.uniform(0, 1)


def _resize(img, w, h, rng):
    u8 = Image.fromarray(np.clip(np.round(img * 255), 0, 255).astype(np.uint8))
    f = [Image.BOX, Image.BILINEAR, Image.BICUBIC, Image.LANCZOS][int(rng.integers(4))]
    return np.asarray(u8.resize((w, h), f)).astype(np.float64) / 255.0


def degrade_v1(hq, rng, scale=2, strength=1.0):
    """hq uint8 [H,W,3] (H, W divisible by scale). Returns (lq_small uint8, lq_up uint8)."""
    H, W = hq.shape[:2]
    x = hq.astype(np.float64) / 255.0
    if rng.random() < 0.25:
        x = _fade(x, rng)
    # first order
    if rng.random() < 0.8:
        x = _blur(x, rng, (0.2, 1.6 if scale > 1 else 1.2))
    if scale > 1:
        x = _resize(np.clip(x, 0, 1), W // scale, H // scale, rng)
    if rng.random() < 0.7:
        x = _noise(x, rng, (1, 18 * strength))
    if rng.random() < 0.6:
        x = _jpeg(np.clip(x, 0, 1), rng, (35, 95))
    # second order
    if rng.random() < 0.4:
        if rng.random() < 0.6:
            x = _blur(x, rng, (0.2, 1.0))
        if rng.random() < 0.5:
            x = _noise(x, rng, (1, 8 * strength))
        if rng.random() < 0.5:
            x = _jpeg(np.clip(x, 0, 1), rng, (45, 95))
    if rng.random() < 0.3:
        x = _film_grain(x, rng)
    small = np.clip(np.round(x * 255), 0, 255).astype(np.uint8)
    if scale > 1:
        up = np.asarray(Image.fromarray(small).resize((W, H), Image.BICUBIC))
    else:
        up = small
    return small, up


# ====================================================================== v2: degradations users actually have
# Real codecs through GStreamer (x264enc, avenc_mpeg4, vp8enc, jpegenc; MPEG-2 through ffmpeg, see gst_codec.py) on a
# short moving sequence, analogue/archival damage (film grain, dust and scratches, fading / colour cast), blur,
# noise, rescaling, in random second-order mixes; x1 as often as x2 (x4 too: `scale` is the caller's).
#
# Parameters come from one generator (`prng`), pixel noise from another (`nrng`), both seeded by `seed`, so the same
# seed gives the same *recipe* on images of any size (train.py / make_pool_v2.py degrade the crop's frame and the
# whole image it comes from with the same recipe, for the global visual prompt).

CODEC_BPP = {  # bits per LQ pixel at 25 frames/s, log-uniform (bikes.mp4 x264 150 kbit/s at 640x272: 0.034)
    "x264": (0.012, 0.35), "vp8": (0.02, 0.45), "mpeg4": (0.04, 0.8), "mpeg2": (0.06, 1.2),
}


def _loguni(rng, lo, hi):
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _u8(x):
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def _f(u8):
    return u8.astype(np.float64) / 255.0


def _noise2(img, prng, nrng, sigma_range=(1, 20), gray_p=0.4, poisson_p=0.3):
    if prng.random() < poisson_p:
        scale = 10 ** prng.uniform(1.5, 3.0)
        if prng.random() < gray_p:
            lum = img.mean(axis=2, keepdims=True)
            return img + nrng.poisson(np.clip(lum, 0, 1) * scale) / scale - lum
        return nrng.poisson(np.clip(img, 0, 1) * scale) / scale
    s = prng.uniform(*sigma_range) / 255.0
    if prng.random() < gray_p:
        return img + nrng.normal(0, s, img.shape[:2])[..., None]
    return img + nrng.normal(0, s, img.shape)


def _film_grain2(img, prng, nrng):
    H, W = img.shape[:2]
    g = prng.uniform(1.0, 2.5)
    amp = prng.uniform(0.01, 0.06)
    colour = prng.random() < 0.3
    h2, w2 = max(2, int(H / g)), max(2, int(W / g))
    chans = 3 if colour else 1
    n = np.stack([np.asarray(Image.fromarray(nrng.normal(0, 1, (h2, w2)).astype(np.float32), mode="F")
                             .resize((W, H), Image.BILINEAR)) for _ in range(chans)], -1)
    n = n / (n.std() + 1e-6)
    lum = img.mean(axis=2, keepdims=True)
    w = 4 * np.clip(lum, 0, 1) * (1 - np.clip(lum, 0, 1))
    return img + amp * (0.5 + w) * n


def _dust_scratches(img, prng, nrng):
    """Film dust (small soft dark/bright specks and hairs) and vertical scratches."""
    H, W = img.shape[:2]
    out = img.copy()
    density = prng.uniform(2, 30)  # specks per 256x256
    n = int(nrng.poisson(density * H * W / 65536.0))
    for _ in range(n):
        r = nrng.uniform(0.4, 2.5)
        cy, cx = nrng.uniform(0, H), nrng.uniform(0, W)
        R = int(np.ceil(3 * r)) + 1
        y0, y1, x0, x1 = max(0, int(cy) - R), min(H, int(cy) + R + 1), max(0, int(cx) - R), min(W, int(cx) + R + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        if nrng.random() < 0.25:  # a hair: elongated
            th = nrng.uniform(0, np.pi); c, s = np.cos(th), np.sin(th)
            d2 = ((c * (yy - cy) + s * (xx - cx)) / (3 * r)) ** 2 + ((-s * (yy - cy) + c * (xx - cx)) / (0.4 * r)) ** 2
        else:
            d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / r ** 2
        a = np.exp(-0.5 * d2)[..., None] * nrng.uniform(0.5, 1.0)
        val = nrng.uniform(0.0, 0.15) if nrng.random() < 0.6 else nrng.uniform(0.8, 1.0)
        out[y0:y1, x0:x1] = out[y0:y1, x0:x1] * (1 - a) + val * a
    for _ in range(int(prng.integers(0, 4))):  # vertical scratches, slowly wandering
        x = nrng.uniform(0, W); wdt = nrng.uniform(0.5, 1.5)
        t0, t1 = sorted(nrng.uniform(0, H, 2)) if nrng.random() < 0.5 else (0, H)
        t0, t1 = int(t0), max(int(t0) + 1, int(t1))
        drift = np.cumsum(nrng.normal(0, 0.15, t1 - t0))
        xs = np.arange(W)[None, :]
        a = np.exp(-0.5 * ((xs - (x + drift)[:, None]) / wdt) ** 2)[..., None] * nrng.uniform(0.2, 0.6)
        val = 1.0 if nrng.random() < 0.5 else 0.05
        out[t0:t1] = out[t0:t1] * (1 - a) + val * a
    return out


def _fade2(img, prng):
    c = prng.uniform(0.65, 1.0)
    lift = prng.uniform(0.0, 0.1)
    tint = prng.normal(0, 0.035, 3)
    sat = prng.uniform(0.5, 1.0)
    gamma = np.exp(prng.normal(0, 0.12, 3))  # per-channel curve (dye fading)
    mid = prng.uniform(0, 1)
    lum = img.mean(axis=2, keepdims=True)
    img = lum + sat * (img - lum)
    img = np.clip(img, 0, 1) ** gamma
    return img * c + lift + tint + (1 - c) * 0.5 * mid


def _resize2(img, w, h, prng):
    f = [Image.BOX, Image.BILINEAR, Image.BICUBIC, Image.LANCZOS][int(prng.integers(4))]
    return _f(np.asarray(Image.fromarray(_u8(img)).resize((w, h), f)))


def _jpeg2(img, prng, q_range=(10, 95), gst_p=0.5):
    """JPEG through GStreamer's jpegenc (4:2:0, IJG) or Pillow (random chroma subsampling)."""
    q = int(prng.integers(q_range[0], q_range[1] + 1))
    u8 = _u8(img)
    if prng.random() < gst_p and u8.shape[0] % 2 == 0 and u8.shape[1] % 2 == 0:
        from gst_codec import codec_roundtrip
        return _f(codec_roundtrip(u8[None], "jpeg", quality=q)[0])
    b = io.BytesIO(); Image.fromarray(u8).save(b, format="JPEG", quality=q, subsampling=int(prng.integers(0, 3)))
    return _f(np.asarray(Image.open(io.BytesIO(b.getvalue())).convert("RGB")))


def _video_codec(img, prng, nrng, codec=None, bpp=None):
    """One decoded frame (a P frame: the last of a short sequence with real motion) of a low-bitrate codec."""
    from gst_codec import codec_roundtrip, moving_sequence
    if codec is None:
        codec = ["x264", "x264", "vp8", "mpeg4", "mpeg2"][int(prng.integers(5))]
    if bpp is None:
        bpp = _loguni(prng, *CODEC_BPP[codec])
    n = int(prng.integers(3, 7))
    speed = prng.uniform(0.0, 3.0)
    u8 = _u8(img)
    H, W = u8.shape[:2]
    u8 = u8[: H // 2 * 2, : W // 2 * 2]
    seq, t = moving_sequence(u8, nrng, n=n, max_speed=speed)
    dec = codec_roundtrip(seq, codec, bpp=bpp, rng=prng)[t]
    out = _f(u8).copy()
    out[:] = _f(dec)
    if out.shape[:2] != (H, W):  # odd side (only in odd-sized callers): keep the last row/column uncoded
        full = img.copy(); full[: out.shape[0], : out.shape[1]] = out; out = full
    return out


def degrade_seeded(hq, seed, scale=2, kind=None):
    """v2 mix. hq uint8 [H,W,3] (H, W divisible by scale). Returns (lq_small uint8, lq_up uint8, info dict).
    kind: None (random) or one of 'video', 'photo', 'archival', 'mild'."""
    prng = np.random.default_rng([int(seed), 0])
    nrng = np.random.default_rng([int(seed), 1])
    H, W = hq.shape[:2]
    w, h = W // scale, H // scale
    x = _f(hq)
    if kind is None:
        kind = ["video", "photo", "archival", "mild"][int(prng.choice(4, p=[0.42, 0.25, 0.2, 0.13]))]
    info = {"kind": kind, "scale": scale}
    if kind == "mild":
        # nearly clean input: the model must not make it worse (light blur / JPEG / high-bitrate video / noise)
        if prng.random() < 0.4:
            x = _blur(x, prng, (0.2, 0.7))
        if scale > 1:
            x = _resize2(np.clip(x, 0, 1), w, h, prng)
        r = prng.random()
        if r < 0.35:
            x = _jpeg2(np.clip(x, 0, 1), prng, (75, 97))
        elif r < 0.7:
            c = ["x264", "vp8", "mpeg4", "mpeg2"][int(prng.integers(4))]
            lo, hi = CODEC_BPP[c]
            x = _video_codec(np.clip(x, 0, 1), prng, nrng, c, _loguni(prng, hi, 3 * hi))
            info["codec"] = c
        elif r < 0.85:
            x = _noise2(x, prng, nrng, (0.5, 4))
    elif kind == "video":
        # camera / scaler softness, optional sensor noise, downscale, low-bitrate codec, optional re-encode
        if prng.random() < 0.5:
            x = _blur(x, prng, (0.2, 1.2))
        if prng.random() < 0.15:
            x = _fade2(x, prng)
        if scale > 1:
            x = _resize2(np.clip(x, 0, 1), w, h, prng)
        if prng.random() < 0.35:
            x = _noise2(x, prng, nrng, (1, 8), poisson_p=0.2)
        c = ["x264", "x264", "vp8", "mpeg4", "mpeg2"][int(prng.integers(5))]
        x = _video_codec(np.clip(x, 0, 1), prng, nrng, c)
        info["codec"] = c
        if prng.random() < 0.25:  # second generation: rescale + another encode (re-uploads, transcodes)
            f = prng.uniform(0.6, 0.95)
            ww, hh = max(2, int(w * f) // 2 * 2), max(2, int(h * f) // 2 * 2)
            x = _resize2(np.clip(x, 0, 1), ww, hh, prng)
            x = _resize2(x, w, h, prng)
            c2 = ["x264", "vp8", "mpeg4", "mpeg2", "jpeg"][int(prng.integers(5))]
            x = _jpeg2(np.clip(x, 0, 1), prng, (30, 90), 1.0) if c2 == "jpeg" else _video_codec(np.clip(x, 0, 1), prng, nrng, c2)
            info["codec2"] = c2
    elif kind == "photo":
        # Real-ESRGAN-like: blur, resize, noise, JPEG (jpegenc or Pillow) at several qualities, second order
        if prng.random() < 0.7:
            x = _blur(x, prng, (0.2, 1.6 if scale > 1 else 1.2))
        if scale > 1:
            x = _resize2(np.clip(x, 0, 1), w, h, prng)
        if prng.random() < 0.6:
            x = _noise2(x, prng, nrng, (1, 18))
        if prng.random() < 0.85:
            x = _jpeg2(np.clip(x, 0, 1), prng, (10, 95))
        if prng.random() < 0.4:
            if prng.random() < 0.5:
                x = _blur(x, prng, (0.2, 1.0))
            if prng.random() < 0.5:
                x = _noise2(x, prng, nrng, (1, 8))
            x = _jpeg2(np.clip(x, 0, 1), prng, (30, 95))
    else:  # archival: fading / colour cast, dust and scratches, film grain, blur, then a digitisation codec
        if prng.random() < 0.7:
            x = _fade2(x, prng)
        if prng.random() < 0.6:
            x = _dust_scratches(np.clip(x, 0, 1), prng, nrng)
        if prng.random() < 0.7:
            x = _blur(x, prng, (0.3, 1.8 if scale > 1 else 1.3))
        if scale > 1:
            x = _resize2(np.clip(x, 0, 1), w, h, prng)
        if prng.random() < 0.7:
            x = _film_grain2(x, prng, nrng)
        elif prng.random() < 0.5:
            x = _noise2(x, prng, nrng, (1, 12))
        r = prng.random()
        if r < 0.5:
            c = ["x264", "vp8", "mpeg4", "mpeg2"][int(prng.integers(4))]
            x = _video_codec(np.clip(x, 0, 1), prng, nrng, c)
            info["codec"] = c
        elif r < 0.8:
            x = _jpeg2(np.clip(x, 0, 1), prng, (25, 95))
    small = _u8(x)
    up = np.asarray(Image.fromarray(small).resize((W, H), Image.BICUBIC)) if scale > 1 else small
    return small, up, info


def degrade(hq, rng, scale=2, strength=1.0, mix="v2"):
    """hq uint8 [H,W,3] (H, W divisible by scale) -> (lq_small uint8, lq_up uint8). mix 'v1': the shipped
    dpir-nano's training mix (the model card's validation); 'v2': degrade_seeded with a seed drawn from rng."""
    if mix == "v1":
        return degrade_v1(hq, rng, scale, strength)
    small, up, _ = degrade_seeded(hq, int(rng.integers(1 << 62)), scale)
    return small, up
