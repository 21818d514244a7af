"""Command line: upscale a file or a folder with ComfyUI as a library (no server).

  python -m d3sr_core --checkpoint v2-1_512-ema-pruned.safetensors \
      --weights d3sr_x4.safetensors --input photos/ --output upscaled/ [--factor 4]

Outputs are PNGs named like the inputs, written atomically; existing files are kept unless
--overwrite. Set COMFYUI_PATH to use your own ComfyUI (default: the pinned host in .host/).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .image_io import IMAGE_EXTENSIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m d3sr_core", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="SD2.1-base checkpoint file")
    p.add_argument("--weights", required=True, help="D3SR weight file (.safetensors)")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--factor", type=float, default=4.0, help="upscale factor, 1..8 (default 4)")
    p.add_argument("--colour-fix", default="adain", choices=("adain", "wavelet", "none"))
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    return p.parse_args(argv)


def list_inputs(path: str) -> list[str]:
    """The image files to process: `path` itself, or the images directly inside the folder."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if files:
            return files
        raise SystemExit(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
    raise SystemExit(f"error: input {path} does not exist")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inputs = list_inputs(args.input)
    for f in (args.checkpoint, args.weights):
        if not os.path.isfile(f):
            raise SystemExit(f"error: file not found: {f}")
    from . import host
    host.import_comfy(cpu=True if args.cpu else None)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    import comfy.sd
    from tqdm import tqdm

    from .image_io import load_image, save_png_atomic
    from .model import load_d3sr
    from .pipeline import upscale

    model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_clip=False)
    d3sr = load_d3sr(model, vae, args.weights, args.strength)
    os.makedirs(args.output, exist_ok=True)
    written = skipped = 0
    for path in tqdm(inputs, desc="D3SR", unit="image", disable=len(inputs) == 1):
        target = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        if os.path.exists(target) and not args.overwrite:
            skipped += 1
            continue
        image = load_image(path)
        save_png_atomic(upscale(d3sr, image, args.factor, args.colour_fix), target)
        written += 1
    print(f"wrote {written} image(s) to {os.path.abspath(args.output)}"
          + (f"; kept {skipped} existing (use --overwrite)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
