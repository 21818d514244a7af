"""GPU speed of D3SR against ComfyUI's stock one-step path, on the FULL-SIZE architectures.

Builds SD2.1-base's UNet (866 M parameters, d3sr_core.architectures.SD21_UNET_CONFIG) and SD's KL
VAE with seeded random weights (no download: the architecture sets the speed), loads them with
ComfyUI's own checkpoint loader, applies a random rank-16 D3SR LoRA, and times, in fp16 and
bf16, after warm-up, the median of 20 runs (CUDA-synchronised wall time, CPU IMAGE in and out,
as a ComfyUI node sees it):
  - ours:  upscale.upscale (bicubic, encode, one UNet step, decode, AdaIN colour fix)
  - ours tiled: tiling.upscale_tiled with its defaults
  - stock: ComfyUI's stock nodes in one run: ImageScale (bicubic) -> VAEEncode -> KSampler
           (1 step, euler, cfg 1, so one model call) -> VAEDecode
for 128 -> 512 and 512 -> 2048. Paper anchors: D3SR 0.11 s, OSEDiff 0.35 s per 512^2 on an
A100; our goal on an H100: 0.03 s per 512^2 output and 2048^2 under 1 s.
Writes benchmarks/results/gpu_<card>.md.

Run: python benchmarks/bench_gpu.py [--runs 20] [--warmup 3] [--dtypes fp16 bf16]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from machine import machine_name, median_time  # noqa: E402

CASES = ((128, 512), (512, 2048))
PAPER = "D3SR 0.11 s and OSEDiff 0.35 s per 512^2 on an A100 (paper); goal 0.03 s per 512^2 and < 1 s for 2048^2"


def build_state_dict(unet_config: dict, seed: int = 0) -> tuple[dict, object]:
    """A checkpoint-style state dict (model.diffusion_model.* + first_stage_model.*) of the UNet
    with `unet_config` and SD's KL VAE with seeded weights, and the UNet module."""
    from devtools import synthetic
    unet = synthetic.build_unet(unet_config, seed)
    vae = synthetic.build_kl_vae(seed + 1)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    return sd, unet


def load(sd: dict, weights, dtype):
    """(D3SRModel, stock ModelPatcher with the same LoRA, VAE) with UNet and VAE in `dtype`."""
    import comfy.sd

    from d3sr_core.model import d3sr_model_from_weights
    model, _clip, _vae, _ = comfy.sd.load_state_dict_guess_config(
        dict(sd), output_vae=False, output_clip=False, model_options={"dtype": dtype})
    vae_sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    vae = comfy.sd.VAE(sd=vae_sd, dtype=dtype)
    d3sr = d3sr_model_from_weights(model, vae, weights, name="random-rank16")
    return d3sr, vae


def time_case(d3sr, vae, cond: list, lr_size: int, out_size: int, args: argparse.Namespace) -> dict:
    """Median times of ours, ours tiled and the stock nodes for one lr_size -> out_size case."""
    import torch

    import nodes
    from d3sr_core import tiling
    from d3sr_core.upscale import upscale
    image = torch.rand(1, lr_size, lr_size, 3, generator=torch.Generator().manual_seed(lr_size))
    factor = out_size / lr_size

    def ours():
        return upscale(d3sr, image, factor, "adain")

    def ours_tiled():
        return tiling.upscale_tiled(d3sr, image, factor, "adain")

    def stock():
        with torch.inference_mode():
            (big,) = nodes.ImageScale().upscale(image, "bicubic", out_size, out_size, "disabled")
            (latent,) = nodes.VAEEncode().encode(vae, big)
            (z,) = nodes.KSampler().sample(d3sr.model, 0, 1, 1.0, "euler", "simple", cond, cond,
                                           latent, denoise=1.0)
            (out,) = nodes.VAEDecode().decode(vae, z)
        return out

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = ours()
    assert out.shape == (1, out_size, out_size, 3)
    row = {"case": f"{lr_size}->{out_size}", "finite": bool(torch.isfinite(out).all()),
           "ours": median_time(ours, args.runs, args.warmup)}
    row["peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
    row["stock"] = median_time(stock, args.runs, args.warmup)
    if not args.no_tiled:
        row["tiled"] = median_time(ours_tiled, args.runs, args.warmup)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16", "fp32"])
    p.add_argument("--no-tiled", action="store_true", help="skip the tiled path")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check the script's plumbing on a CPU with the tiny UNet and 16 -> 64 (prints one "
                        "row, writes nothing: no timings worth reporting)")
    args = p.parse_args()

    import torch
    if args.cpu_smoke:
        return smoke(args)
    if not torch.cuda.is_available():
        print("bench_gpu.py: skipped, no CUDA GPU is visible (torch.cuda.is_available() is False). "
              "Nothing was measured. Run it on a machine with an NVIDIA GPU; CPU numbers come from "
              "benchmarks/bench_tiling_cpu.py.", file=sys.stderr)
        return 0

    sys.path.insert(0, ROOT)
    from d3sr_core import host
    host.import_comfy(cpu=False)
    import comfy.model_management as mm
    import comfy.utils

    from devtools import synthetic
    comfy.utils.set_progress_bar_enabled(False)

    card = torch.cuda.get_device_name(0)
    t0 = time.time()
    sd, unet_fp32 = build_state_dict(synthetic.SD21_UNET_CONFIG)
    weights = synthetic.random_d3sr_weights(unet_fp32, rank=16, alpha=16.0, seed=0)
    del unet_fp32
    print(f"{card}: built full-size UNet + VAE in {time.time() - t0:.0f} s", flush=True)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

    rows = []
    for name in args.dtypes:
        dtype = dtypes[name]
        d3sr, vae = load(sd, weights, dtype)
        cond = [[d3sr.text_embedding.to(dtype), {}]]
        for lr_size, out_size in CASES:
            row = time_case(d3sr, vae, cond, lr_size, out_size, args)
            row["dtype"] = name
            rows.append(row)
            print(row, flush=True)
        del d3sr, vae
        mm.unload_all_models()
        mm.soft_empty_cache()

    slug = re.sub(r"[^A-Za-z0-9]+", "_", card).strip("_").lower()
    path = os.path.join(args.out_dir, f"gpu_{slug}.md")
    os.makedirs(args.out_dir, exist_ok=True)
    lines = [f"# D3SR on {card}\n",
             f"Machine: {machine_name()}; CUDA {torch.version.cuda}. "
             f"Full-size SD2.1-base UNet + KL VAE, seeded random weights, random rank-16 LoRA. "
             f"Median of {args.runs} after {args.warmup} warm-up runs; CPU IMAGE in and out.\n",
             f"Command: `python benchmarks/bench_gpu.py {' '.join(sys.argv[1:])}`\n",
             f"Anchors: {PAPER}.\n",
             "| dtype | case | ours (s) | ours tiled (s) | stock nodes (s) | ours / stock | ours peak alloc (GiB) "
             "| output finite |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tiled = f"{r['tiled']:.4f}" if "tiled" in r else "-"
        lines.append(f"| {r['dtype']} | {r['case']} | {r['ours']:.4f} | {tiled} | {r['stock']:.4f} | "
                     f"{r['ours'] / r['stock']:.2f} | {r['peak_gb']:.1f} | {r['finite']} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", path)
    return 0


def smoke(args: argparse.Namespace) -> int:
    """Run every measured path once on the CPU with the tiny test UNet (plumbing check only)."""
    sys.path.insert(0, ROOT)
    from d3sr_core import host
    host.import_comfy(cpu=True)
    import comfy.utils
    import torch

    from devtools import synthetic
    comfy.utils.set_progress_bar_enabled(False)
    sd, unet = build_state_dict(synthetic.TINY_SD2_UNET_CONFIG)
    weights = synthetic.random_d3sr_weights(unet, rank=4, alpha=4.0, seed=0)
    d3sr, vae = load(sd, weights, torch.float32)
    args.runs, args.warmup = 1, 0
    row = time_case(d3sr, vae, [[d3sr.text_embedding, {}]], 16, 64, args)
    print("cpu smoke:", row)
    return 0 if row["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
