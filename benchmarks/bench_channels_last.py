"""Where channels-last pays on the CPU: the full SD2.1 UNet (one D3SR step) and the KL VAE
(encode, decode) at growing sizes, with the input in channels-last vs plain (contiguous NCHW)
memory order. oneDNN reorders each convolution's weights to the input's layout on every call:
a fixed cost per layer that large images amortise and tiny ones do not. The crossover sets
d3sr_core.pipeline.CHANNELS_LAST_MIN_PIXELS.

    python benchmarks/bench_channels_last.py [--sd FILE] [--runs 3]

--sd: any SD2.1-base-shaped checkpoint (bench_peers.py --work DIR writes one as
DIR/sd.safetensors); without it a seeded one is written to a temporary folder (3.8 GB).
Writes benchmarks/results/channels_last_cpu.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from machine import machine_name, median_time  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd", help="an SD2.1-base-shaped checkpoint (default: a seeded one)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latents", default="2,4,8,16,32,64", help="latent sides to time")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "channels_last_cpu.md"))
    args = parser.parse_args(argv)

    from d3sr_core import host
    host.import_comfy(cpu=True)
    import comfy.sd

    from d3sr_core.atomic_file import write_text_atomic
    from d3sr_core.pipeline import sigma_for_timestep

    with tempfile.TemporaryDirectory() as work:
        sd = args.sd
        if sd is None:
            from devtools import synthetic
            sd = synthetic.write_checkpoint(os.path.join(work, "sd.safetensors"), synthetic.SD21_UNET_CONFIG)
        model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sd, output_vae=True, output_clip=False)
    base = model.model
    context = torch.zeros(1, 77, 1024)
    sigma = torch.full((1,), sigma_for_timestep(399))
    plain = torch.contiguous_format
    last = torch.channels_last
    rows = []
    with torch.inference_mode():
        for side in (int(s) for s in args.latents.split(",")):
            z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(side))
            img = torch.rand(1, 3, side * 8, side * 8, generator=torch.Generator().manual_seed(side))
            row = {"latent": side, "image": side * 8}
            for name, fmt in (("plain", plain), ("last", last)):
                x = z.contiguous(memory_format=fmt)
                row[f"unet_{name}"] = median_time(
                    lambda x=x: base.apply_model(x, sigma, c_crossattn=context), args.runs, 1)
                row[f"decode_{name}"] = median_time(lambda x=x: vae.decode(x), args.runs, 1)
            # encode: ComfyUI's VAE takes BHWC and moves it to BCHW itself; a contiguous BHWC
            # image becomes a channels-last BCHW one, a BHWC view of a BCHW image a plain one.
            row["encode_plain"] = median_time(lambda img=img: vae.encode(img.movedim(1, -1)), args.runs, 1)
            row["encode_last"] = median_time(
                lambda img=img: vae.encode(img.movedim(1, -1).contiguous()), args.runs, 1)
            rows.append(row)
            print(row, flush=True)

    lines = [
        "# Channels-last vs plain memory order on the CPU, by size",
        "",
        f"Machine: {machine_name()}",
        f"Command: `python benchmarks/bench_channels_last.py{' --sd ' + args.sd if args.sd else ''} "
        f"--runs {args.runs} --latents {args.latents}`",
        "(full SD2.1-base UNet and KL VAE, fp32, batch 1; median of the runs after one warm-up call).",
        "Speed-up = plain time / channels-last time: above 1, channels-last is faster.",
        "",
        "| latent | image | UNet plain s | UNet last s | UNet speed-up | decode plain s | decode last s "
        "| decode speed-up | encode plain s | encode last s | encode speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r['latent']}x{r['latent']}", f"{r['image']}x{r['image']}"]
        for part in ("unet", "decode", "encode"):
            p, c = r[f"{part}_plain"], r[f"{part}_last"]
            cells += [f"{p:.3f}", f"{c:.3f}", f"{p / c:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
