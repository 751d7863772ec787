"""Archival-style random degradations (Real-ESRGAN-like second-order mixes) for dpir-nano.

degrade(hq_uint8[H,W,3], rng, scale) -> (lq_small_uint8[H/scale,W/scale,3], lq_up_uint8[H,W,3])

lq_up is what the plugin feeds the model: the degraded LQ frame upsampled to the output size with
PIL-style bicubic on 8-bit values (src/restorer.rs does the same), so train and inference agree.
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


def degrade(hq, rng, scale=2, strength=1.0):
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
