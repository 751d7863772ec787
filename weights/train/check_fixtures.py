#!/usr/bin/env python3
"""Check that the training-side PyTorch code (model.py) reproduces the official DPIR references in
shared/fixtures: transformer forward with control injection (3.1) and the sampler sigmas (3.7)."""
import json, os, sys
import torch
from safetensors.torch import load_file
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as M

FIX = os.environ.get("DPIR_FIXTURES", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "fixtures"))
torch.set_num_threads(1)
for case in ["dpir_transformer_square", "dpir_transformer_nonsquare"]:
    d = os.path.join(FIX, case)
    cfg = json.load(open(os.path.join(d, "config.json")))
    lc = cfg.get("library_config") or cfg["library_configs"]["transformer"]
    tr = M.DpirTransformer(**{k: v for k, v in lc.items() if not k.startswith("_")})
    sd = load_file(os.path.join(d, cfg["weight_files"]["transformer"]))
    tr.add_control((sd["control_conv.0.weight"].shape[0], sd["control_conv.2.weight"].shape[0]))
    tr.load_state_dict(sd)
    io = load_file(os.path.join(d, "io.safetensors"))
    with torch.no_grad():
        o = tr.dpir_forward(io["hidden_states"], io["controlnet_cond"], io["encoder_hidden_states"],
                            io["pooled_projections"], io["timestep"])
    err = (o - io["sample"]).abs().max().item()
    print(f"{case}: max |diff| vs official = {err:.2e}")
    assert err < 1e-4
io = load_file(os.path.join(FIX, "scheduler/io.safetensors"))
for n in (1, 4, 10, 28):
    s = torch.tensor([float(x) for x in M.sd3_sigmas(n, 3.0)])
    err = (s - io[f"sigmas_{n}"]).abs().max().item()
    print(f"sigmas_{n}: max |diff| = {err:.2e}")
    assert err < 1e-6
print("ok")
