"""dpir-nano: DPIR (dual prompting, DiT) architecture at a tiny size, in PyTorch.

State-dict keys are exactly those of the official checkpoints / the Rust loader:
  transformer: diffusers 0.29.2 SD3Transformer2DModel names + control_conv.{0..5}.*
  vae:         diffusers AutoencoderKL names
  image encoders: HF CLIPVisionModelWithProjection names
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, AutoencoderKL
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

# ---------------------------------------------------------------- configs
CLIP_ONE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                patch_size=32, hidden_act="quick_gelu", projection_dim=64, layer_norm_eps=1e-5, num_channels=3)
CLIP_TWO = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                patch_size=32, hidden_act="gelu", projection_dim=64, layer_norm_eps=1e-5, num_channels=3)
POOLED = CLIP_ONE["hidden_size"] + CLIP_TWO["projection_dim"]  # 128
JOINT = POOLED  # no T5: the "T5 width" is just the pooled width
LATENT = 32  # latent channels (SD3: 16); 32 at x8 lifts the tiny autoencoder's ceiling (measured in the model card)
TRANSFORMER = dict(sample_size=32, patch_size=2, in_channels=LATENT, num_layers=6, attention_head_dim=32,
                   num_attention_heads=4, joint_attention_dim=JOINT, caption_projection_dim=128,
                   pooled_projection_dim=POOLED, out_channels=LATENT, pos_embed_max_size=96)
CONTROL_WIDTHS = (64, 128)  # official 256, 512 (the Rust side reads widths from the weights); groups 4/8/8 kept
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[16, 16, 32, 64], layers_per_block=1,
           act_fn="silu", latent_channels=LATENT, norm_num_groups=8, sample_size=1024, scaling_factor=1.0,
           shift_factor=0.0,  # measured on the training pool after AE training (export writes them)
           use_quant_conv=False, use_post_quant_conv=False)
CLIP_TOKENS = 77
TEXT_TOKENS = 0  # zero "T5" tokens appended (DPIR: 256)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class DpirTransformer(SD3Transformer2DModel):
    """SD3Transformer2DModel + DPIR's control_conv, forward as DPIR's transformer_sd3_cnext.py."""

    def add_control(self, widths=CONTROL_WIDTHS):
        inner = self.config.num_attention_heads * self.config.attention_head_dim
        a, b = widths
        self.control_conv = nn.Sequential(
            nn.Conv2d(self.config.in_channels, a, 3, padding=1), nn.GroupNorm(4, a),
            nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(8, b),
            nn.Conv2d(b, inner, 3, padding=1), nn.GroupNorm(8, inner))
        # dpir-nano: the positional table is all zeros (translation-equivariant model; any size/tiling)
        with torch.no_grad():
            self.pos_embed.pos_embed.zero_()
        return self

    def dpir_forward(self, hidden_states, controlnet_cond, encoder_hidden_states, pooled_projections, timestep):
        height, width = hidden_states.shape[-2:]
        h = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep, pooled_projections)
        ctx = self.context_embedder(encoder_hidden_states)
        for i, block in enumerate(self.transformer_blocks):
            ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb)
            if i == 0:
                c = self.control_conv(controlnet_cond)
                c = c.flatten(2).transpose(1, 2)  # b c h w -> b (h w) c
                mc = c.mean(dim=(1, 2), keepdim=True); sc = c.std(dim=(1, 2), keepdim=True)
                mh = h.mean(dim=(1, 2), keepdim=True); sh = h.std(dim=(1, 2), keepdim=True)
                h = h + (c - mc) / (sc + 1e-9) * sh + mh
        h = self.norm_out(h, temb)
        h = self.proj_out(h)
        p = self.config.patch_size
        hh, ww = height // p, width // p
        h = h.reshape(h.shape[0], hh, ww, p, p, self.out_channels)
        h = torch.einsum("nhwpqc->nchpwq", h)
        return h.reshape(h.shape[0], self.out_channels, hh * p, ww * p)


def make_transformer():
    return DpirTransformer(**TRANSFORMER).add_control()


def make_vae():
    return AutoencoderKL(**VAE)


def make_clip(cfg):
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg))


class PromptEncoder(nn.Module):
    """The two vision towers and DPIR's prompt assembly (fixture README 3.6), single-tile global prompt."""

    def __init__(self):
        super().__init__()
        self.one = make_clip(CLIP_ONE)
        self.two = make_clip(CLIP_TWO)
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, img01):
        """img01 [B,3,H,W] in [0,1] -> CLIP pixel values (shortest side 224 bicubic+antialias, centre crop)."""
        B, C, H, W = img01.shape
        s = 224 / min(H, W)
        nh, nw = max(224, int(H * s)), max(224, int(W * s))
        if H <= W:
            nh, nw = 224, int(224 * W / H)
        else:
            nh, nw = int(224 * H / W), 224
        x = F.interpolate(img01, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        x = (x * 255).round().clamp(0, 255) / 255
        t = (nh - 224) // 2; l = (nw - 224) // 2
        x = x[:, :, t:t + 224, l:l + 224]
        return (x - self.mean) / self.std

    def forward(self, local01, global01=None):
        px_l = self.preprocess(local01)
        px_g = px_l if global01 is None else self.preprocess(global01)
        o1 = self.one(pixel_values=px_l)
        local = o1.last_hidden_state  # raw, before post_layernorm
        e2 = self.two(pixel_values=px_l).image_embeds
        pooled = torch.cat([local[:, 0, :], e2], dim=1)
        if global01 is None:
            g = pooled[:, None, :]
        else:
            g1 = self.one(pixel_values=px_g).last_hidden_state[:, 0, :]
            g = torch.cat([g1, self.two(pixel_values=px_g).image_embeds], dim=1)[:, None, :]
        P = pooled.shape[1]
        local = F.pad(local, (0, P - local.shape[2]))
        tok = torch.cat([local, g], dim=1)
        if tok.shape[1] < CLIP_TOKENS:
            tok = F.pad(tok, (0, 0, 0, CLIP_TOKENS - tok.shape[1]))
        tok = tok[:, :CLIP_TOKENS]
        tok = F.pad(tok, (0, JOINT - P))
        if TEXT_TOKENS:
            tok = torch.cat([tok, tok.new_zeros(tok.shape[0], TEXT_TOKENS, JOINT)], dim=1)
        return tok, pooled


class Fusion(nn.Module):
    """The LQ-skip fusion stage (model.json `fusion`, src/model/fusion.rs): after the colour fix,
    `out = lq + high(r(lq, restored - lq))`, r = pixel-unshuffle (x`downscale`) -> `num_layers` 3x3 convolutions
    (`channels` wide, ReLU between) -> pixel-shuffle, high = minus the wavelet colour fix's low band (5 levels). Zero-initialised last layer: untrained it returns the input,
    so training starts from "never worse than the input" and learns what of the diffusion output to keep
    (fidelity in the spirit of StableSR's CFW, at full resolution in pixel space). Weights `convs.{i}.{weight,bias}`."""

    def __init__(self, channels=48, num_layers=8, downscale=2):
        super().__init__()
        r = downscale
        self.config = dict(channels=channels, num_layers=num_layers, downscale=downscale)
        widths = [6 * r * r] + [channels] * (num_layers - 1) + [3 * r * r]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:]))
        nn.init.zeros_(self.convs[-1].weight)
        nn.init.zeros_(self.convs[-1].bias)

    def forward(self, lq, restored):
        """lq, restored: NCHW in [0, 1], sides multiples of `downscale`. Returns the fused frame (unclamped)."""
        r = self.config["downscale"]
        x = F.pixel_unshuffle(torch.cat([lq, restored - lq], dim=1), r)
        for i, c in enumerate(self.convs):
            x = c(x)
            if i + 1 < len(self.convs):
                x = F.relu(x)
        out = lq + F.pixel_shuffle(x, r)
        if not getattr(self, "high_pass", True):  # training's first phase only (fusion.py --no-high-pass)
            return out
        # The low band stays the input's (the wavelet colour fix's split): the stage restores detail, noise and
        # blocks, never global tone, which it cannot tell from a photo's own colours.
        return wavelet_color_fix(out, lq)


# ---------------------------------------------------------------- sampler (SD3 FlowMatchEuler, fixture 3.7)
def sd3_sigmas(n, shift=3.0):
    import numpy as np
    smin = np.float32(shift * 0.001 / (1 + (shift - 1) * 0.001))
    t = np.linspace(1000.0, float(smin) * 1000.0, n)
    s = t / 1000.0
    sig = (shift * s / (1 + (shift - 1) * s)).astype(np.float32)
    return list(sig) + [np.float32(0.0)]


def _axis_starts(side, tile, stride):
    if side <= tile:
        return [0]
    last = side - tile
    v = list(range(0, last + 1, stride))
    if last % stride:
        v.append(last)
    return v


def _gauss(h, w, var=0.01):
    import numpy as np
    xs = np.exp(-((np.arange(w) - (w - 1) / 2) ** 2) / (w * w) / (2 * var)) / np.sqrt(2 * np.pi * var)
    ys = np.exp(-((np.arange(h) - h / 2) ** 2) / (h * h) / (2 * var)) / np.sqrt(2 * np.pi * var)
    return torch.from_numpy(np.outer(ys, xs)).float()


def velocity(tr, x, z_lq, ctx, pooled, t, tile=None, overlap=8):
    """The transformer's velocity, per latent tile blended with Gaussian weights when the latent is larger than
    `tile` (src/model/tiling.rs, after the official `_sw` pipeline; the plugin's tile is at most
    pos_embed_max_size * patch_size)."""
    H, W = x.shape[-2:]
    if tile is None or (H <= tile and W <= tile):
        return tr.dpir_forward(x, z_lq, ctx, pooled, t)
    th, tw = min(tile, H), min(tile, W)
    wgt = _gauss(th, tw)
    acc = torch.zeros_like(x); ws = torch.zeros(1, 1, H, W)
    for y0 in _axis_starts(H, tile, tile - overlap):
        for x0 in _axis_starts(W, tile, tile - overlap):
            sl = (..., slice(y0, y0 + th), slice(x0, x0 + tw))
            acc[sl] += tr.dpir_forward(x[sl], z_lq[sl], ctx, pooled, t) * wgt
            ws[sl] += wgt
    return acc / ws


@torch.no_grad()
def sample(tr, z_lq, ctx, pooled, noise, steps, shift, tile=None, overlap=8):
    sig = sd3_sigmas(steps, shift)
    x = noise
    for i in range(steps):
        s = float(sig[i]); sn = float(sig[i + 1])
        t = torch.full((x.shape[0],), s * 1000.0)
        v = velocity(tr, x, z_lq, ctx, pooled, t, tile, overlap)
        den = x - v * s
        d = (x - den) / s
        x = x + d * (sn - s)
    return x


# ---------------------------------------------------------------- shared by train.py / eval.py
def _wblur(x, r):
    k = x.new_tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]])[None, None]
    return F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), k.repeat(x.shape[1], 1, 1, 1), groups=x.shape[1], dilation=r)


def wavelet_color_fix(target, source, levels=5):
    """StableSR's wavelet colour fix on [0,1] NCHW (target = output, source = LQ): target's high bands + source's
    low band. Every blur is linear (replicate padding too), so that is target - low(target - source): one
    decomposition, as src/model/color_fix.rs. Differentiable (train.py's decoder stage backpropagates through it)."""
    d = target - source
    for i in range(levels):
        d = _wblur(d, 2 ** i)
    return target - d


def cosine_lr(base, frac, warm=1.0):
    """Learning rate at fraction `frac` of the wall-clock budget: cosine from base to base/10, times a warm-up factor."""
    import math
    return base * min(1.0, warm) * (0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))) + 0.1)


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


def count(m):
    return sum(p.numel() for p in m.parameters())


# ---- the exported model and the plugin's per-frame path (eval.py, benches/compare_pytorch.py) ----

def load_model(d):
    """dpir-nano's exported files (model.json and the f16 safetensors, upcast to f32): what the
    Rust loader reads. Returns (manifest, transformer, vae, prompt encoder)."""
    import json, os
    from safetensors.torch import load_file
    mj = json.load(open(os.path.join(d, "model.json")))
    tc = json.load(open(os.path.join(d, mj["transformer"]["config"])))
    tr = DpirTransformer(**{k: v for k, v in tc.items() if not k.startswith("_")})
    sd = load_file(os.path.join(d, mj["transformer"]["weights"][0]))
    a = sd["control_conv.0.weight"].shape[0]; b = sd["control_conv.2.weight"].shape[0]
    tr.add_control((a, b))
    tr.load_state_dict({k: v.float() for k, v in sd.items()})
    vc = json.load(open(os.path.join(d, mj["vae"]["config"])))
    vae = AutoencoderKL(**{k: v for k, v in vc.items() if not k.startswith("_")})
    vae.load_state_dict({k: v.float() for k, v in load_file(os.path.join(d, mj["vae"]["weights"][0])).items()})
    pe = PromptEncoder()
    for name, tower in [("image_encoder_one", "one"), ("image_encoder_two", "two")]:
        c = json.load(open(os.path.join(d, mj[name]["config"])))
        m = CLIPVisionModelWithProjection(CLIPVisionConfig(**c))
        m.load_state_dict({k: v.float() for k, v in load_file(os.path.join(d, mj[name]["weights"][0])).items()})
        setattr(pe, tower, m)
    # Carried by the prompt encoder so that the (manifest, transformer, vae, prompt encoder) tuple every caller
    # unpacks stays as it was; nano_restore applies it.
    pe.fusion = load_fusion(d, mj)
    return mj, tr.eval(), vae.eval(), pe.eval()


def load_fusion(d, mj):
    """The model's fusion stage (model.json `fusion`), or None."""
    import json, os
    from safetensors.torch import load_file
    spec = mj.get("fusion")
    if not spec:
        return None
    c = json.load(open(os.path.join(d, spec["config"])))
    fu = Fusion(c["channels"], c["num_layers"], c["downscale"])
    fu.load_state_dict({k: v.float() for k, v in load_file(os.path.join(d, spec["weights"][0])).items()})
    return fu.eval()


@torch.no_grad()
def nano_restore(mj, tr, vae, pe, up_u8, seed=2025, tile=0, noise=None, global_u8=None, fusion=True):
    """The plugin's per-frame path in PyTorch, for one frame already at the output size (sides
    multiples of 16): posterior-mode LQ latent, prompts, seeded (or given) initial noise, the
    sampler with the plugin's latent tiles, decode, wavelet colour fix. Returns (no colour fix,
    wavelet, then the fusion stage when the model has one and `fusion`), NCHW floats in [0, 1]. global_u8: the clip's key frame for the global prompt (as the element:
    global prompt per clip, local per frame); None: this frame (a still image)."""
    H, W = up_u8.shape[:2]
    up = torch.from_numpy(up_u8).permute(2, 0, 1)[None].float() / 255.0
    sf, sh = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    mean = vae.encoder(up * 2 - 1).chunk(2, dim=1)[0]
    z_lq = (mean - sh) * sf
    if global_u8 is None:
        ctx, pooled = pe(up)
    else:
        ctx, pooled = pe(up, torch.from_numpy(np.ascontiguousarray(global_u8)).permute(2, 0, 1)[None].float() / 255.0)
    if noise is None:
        noise = torch.randn(z_lq.shape, generator=torch.Generator().manual_seed(seed))
    s = mj["sampler"]
    # The plugin's latent tiles: model.json's, else the largest its position table takes.
    tile = tile or s.get("tile_size") or tr.config.pos_embed_max_size * tr.config.patch_size
    overlap = s.get("tile_overlap", min(8, tile // 4))
    z = sample(tr, z_lq, ctx, pooled, noise, s["default_steps"], s["shift"], tile=tile, overlap=overlap)
    dec = vae.decoder(z / sf + sh)
    out01 = ((dec + 1) / 2).clamp(0, 1)
    wav = wavelet_color_fix(out01, up).clamp(0, 1)
    fu = getattr(pe, "fusion", None) if fusion else None
    if fu is not None:
        wav = fu(up, wav).clamp(0, 1)
    return out01, wav
