#!/usr/bin/env python3
"""Export dpir-nano checkpoints to weights/dpir-nano/ (f16 safetensors, diffusers/HF configs, model.json)."""
import argparse, hashlib, json, os, sys
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as M
import train as T

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "..", "dpir-nano"))


def clean_cfg(cfg, cls, version_key, version):
    d = {"_class_name": cls, version_key: version} if cls else {}
    for k, v in dict(cfg).items():
        if not k.startswith("_"):
            d[k] = list(v) if isinstance(v, tuple) else v
    return d


def save_sd(sd, path, meta):
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}
    save_file(sd, path, metadata=meta)
    os.chmod(path, 0o644)


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--color-fix", default="none",
                    help="not written: the Rust manifest (src/model/loader.rs, deny_unknown_fields) has no such key; "
                         "the colour fix is the element's `color-fix` property (default wavelet)")
    ap.add_argument("--pos-embed-max-size", type=int, default=8)
    ap.add_argument("--tile-size", type=int, default=16, help="sampler.tile_size (latents; <= pos_embed_max_size * 2)")
    ap.add_argument("--tile-overlap", type=int, default=4, help="sampler.tile_overlap (latents)")
    ap.add_argument("--vae-tiling", default="56,4,2", help="vae.tiling tile,overlap,halo in latents ('' for none)")
    a = ap.parse_args()
    out = a.out
    for d in ["transformer", "vae", "image_encoder_one", "image_encoder_two"]:
        os.makedirs(os.path.join(out, d), exist_ok=True)
    vae = T.load_vae_frozen()
    ck = torch.load(os.path.join(T.CKPT, "dit.pt"), weights_only=False)
    if "dec" in ck:  # decoder fine-tuned during the DiT stage (encoder / latent space unchanged)
        vae.decoder.load_state_dict(ck["dec"])
    dec_path = os.path.join(T.CKPT, "dec.pt")
    if os.path.exists(dec_path):  # stage `dec`: decoder fine-tuned on the sampler's outputs
        vae.decoder.load_state_dict(torch.load(dec_path, weights_only=False, map_location="cpu")["dec"])
    # The positional table is all zeros; its size only bounds the plugin's latent tile (pos_embed_max_size x
    # patch_size). --pos-embed-max-size 8 -> 16-latent (128 px) tiles = the training crop, measured best.
    M.TRANSFORMER["pos_embed_max_size"] = a.pos_embed_max_size
    tr = M.make_transformer()
    sd = dict(ck["tr"]); sd["pos_embed.pos_embed"] = torch.zeros_like(tr.pos_embed.pos_embed)
    assert ck["tr"]["pos_embed.pos_embed"].abs().max() == 0, "the trained positional table is not all zeros"
    tr.load_state_dict(sd)
    pe = M.PromptEncoder(); pe.load_state_dict(ck["pe"])
    meta = {"format": "pt", "model": "dpir-nano"}

    tcfg = clean_cfg(tr.config, "SD3Transformer2DModel", "_diffusers_version", "0.29.2")
    json.dump(tcfg, open(os.path.join(out, "transformer/config.json"), "w"), indent=2)
    save_sd(tr.state_dict(), os.path.join(out, "transformer/diffusion_pytorch_model.safetensors"), meta)

    vcfg = clean_cfg(vae.config, "AutoencoderKL", "_diffusers_version", "0.29.2")
    json.dump(vcfg, open(os.path.join(out, "vae/config.json"), "w"), indent=2)
    save_sd(vae.state_dict(), os.path.join(out, "vae/diffusion_pytorch_model.safetensors"), meta)

    for name, m in [("image_encoder_one", pe.one), ("image_encoder_two", pe.two)]:
        c = m.config.to_dict()
        c["architectures"] = ["CLIPVisionModelWithProjection"]
        c["torch_dtype"] = "float16"
        json.dump(c, open(os.path.join(out, name, "config.json"), "w"), indent=2)
        save_sd(m.state_dict(), os.path.join(out, name, "model.safetensors"), meta)

    files = ["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
             "vae/diffusion_pytorch_model.safetensors", "image_encoder_one/config.json", "image_encoder_one/model.safetensors",
             "image_encoder_two/config.json", "image_encoder_two/model.safetensors"]
    manifest = {
        "format": "gst-dpir/1",
        "name": "dpir-nano",
        "transformer": {"config": "transformer/config.json", "weights": ["transformer/diffusion_pytorch_model.safetensors"]},
        "vae": {"kind": "autoencoder_kl", "config": "vae/config.json", "weights": ["vae/diffusion_pytorch_model.safetensors"]},
        "image_encoder_one": {"config": "image_encoder_one/config.json", "weights": ["image_encoder_one/model.safetensors"]},
        "image_encoder_two": {"config": "image_encoder_two/config.json", "weights": ["image_encoder_two/model.safetensors"]},
        "text_encoder": None,
        "sampler": {"shift": a.shift, "num_train_timesteps": 1000, "default_steps": a.steps, "tile_size": a.tile_size,
                    "tile_overlap": a.tile_overlap},
        "prompt": {"text_tokens": M.TEXT_TOKENS, "clip_tokens": M.CLIP_TOKENS, "tile_size": 1024, "tile_stride": 960},
        "sha256": {f: sha(os.path.join(out, f)) for f in files},
    }
    if a.vae_tiling:
        t, o, h = (int(v) for v in a.vae_tiling.split(","))
        manifest["vae"]["tiling"] = {"tile": t, "overlap": o, "halo": h}
    json.dump(manifest, open(os.path.join(out, "model.json"), "w"), indent=2)
    total = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    print(json.dumps({"bytes": total, "params": {"transformer": M.count(tr), "vae": M.count(vae), "image_encoder_one": M.count(pe.one),
                      "image_encoder_two": M.count(pe.two)}, "dit_steps": ck["step"], "dit_seconds": round(ck["spent"])}))


if __name__ == "__main__":
    main()
