"""The D3SRUpscale pipeline against the bare sum of its parts, on the tiny test model, 128->512.

Bare: VAE encoder + quant_conv, one UNet call, post_quant_conv + decoder on the same (already
LoRA-patched) modules and sizes, no ComfyUI wrappers. Node: d3sr_core.upscale.upscale with
colour fix 'none' (bicubic upsample, padding, memory management, dtype casts, crop).
Median of N runs after warm-up, the two paths alternated. Writes benchmarks/results/node_overhead_cpu.md.

  python benchmarks/bench_node_overhead.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))

from d3sr_core import host  # noqa: E402

host.import_comfy(cpu=True)

import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402
from machine import machine_name  # noqa: E402

from d3sr_core import comfy_internals  # noqa: E402
from d3sr_core.atomic_file import write_text_atomic  # noqa: E402
from d3sr_core.model import d3sr_model_from_weights  # noqa: E402
from d3sr_core.upscale import upscale  # noqa: E402
from devtools import synthetic  # noqa: E402


def interleaved_medians(fns: list, runs: int) -> list[float]:
    """Median seconds of each callable, runs alternated so machine drift hits all alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = synthetic.write_checkpoint(f"{tmp}/tiny.safetensors")
        model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_clip=False)
    unet = synthetic.build_unet(synthetic.TINY_SD2_UNET_CONFIG)
    d3sr = d3sr_model_from_weights(model, vae, synthetic.random_d3sr_weights(unet))
    lr = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(0))

    mm.load_models_gpu([d3sr.model])  # patches merged into the weights
    diffusion = d3sr.model.model.diffusion_model
    ae = comfy_internals.vae_autoencoder(vae)
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    ctx = d3sr.text_embedding
    t = torch.tensor([float(d3sr.timestep)])

    @torch.no_grad()
    def bare():
        z = ae.quant_conv(ae.encoder(x))[:, :4] * 0.18215
        eps = diffusion(z, t, context=ctx)
        return ae.decoder(ae.post_quant_conv((z - eps) / 0.18215))

    node, bare_t = interleaved_medians([lambda: upscale(d3sr, lr, 4.0, "none"), bare], args.runs)
    ratio = node / bare_t
    out = ROOT / "benchmarks" / "results" / "node_overhead_cpu.md"
    text = ("# D3SRUpscale vs the bare forward (tiny test model, 128 -> 512, fp32)\n\n"
            f"Machine: {machine_name()}\n\n"
            f"Command: `python benchmarks/bench_node_overhead.py --runs {args.runs}` "
            f"(median of {args.runs}, runs interleaved)\n\n"
            "| path | seconds |\n|---|---|\n"
            f"| bare encode + UNet + decode | {bare_t:.3f} |\n| upscale.upscale | {node:.3f} |\n\n"
            f"Ratio node / bare: **{ratio:.3f}** (goal: at most 1.10)\n")
    write_text_atomic(out, text)
    print(text)


if __name__ == "__main__":
    main()
