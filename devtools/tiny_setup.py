"""The tiny CPU training set-up: generated models and images for training/configs/tiny_cpu.yaml.

    python -m devtools.tiny_setup DIR          (also: python -m training.train --make-tiny-setup DIR)
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from d3sr_core import host
from d3sr_core.image_io import save_png_atomic

from . import synthetic


def prepare_tiny_setup(root: str, images: int = 6, size: int = 48, seed: int = 0) -> dict[str, str]:
    """Write what training/configs/tiny_cpu.yaml expects under `root`: models/tiny-sd2.safetensors
    (SD2-shaped, ComfyUI detects it as SD2.x), models/mini-sdxl.safetensors (SDXL-shaped UNet
    only: the discriminator reads no VAE) and data/ with `images` seeded smooth random RGB
    images of `size` x `size` pixels. Returns {"generator", "discriminator", "data"} paths;
    existing model files are kept."""
    host.import_comfy()
    paths = {"generator": os.path.join(root, "models", "tiny-sd2.safetensors"),
             "discriminator": os.path.join(root, "models", "mini-sdxl.safetensors"),
             "data": os.path.join(root, "data")}
    if not os.path.exists(paths["generator"]):
        synthetic.write_checkpoint(paths["generator"], synthetic.TINY_SD2_UNET_CONFIG, seed=seed)
    if not os.path.exists(paths["discriminator"]):
        synthetic.write_sdxl_checkpoint(paths["discriminator"], synthetic.MINI_SDXL_UNET_CONFIG, seed=seed + 7,
                                        vae=False)
    os.makedirs(paths["data"], exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(images):
        coarse = torch.from_numpy(rng.random((1, 3, 6, 6), dtype=np.float32))
        img = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        save_png_atomic(img.permute(0, 2, 3, 1), os.path.join(paths["data"], f"img{i:03d}.png"))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.tiny_setup", description=__doc__.splitlines()[0])
    parser.add_argument("root", metavar="DIR", help="folder to write models/ and data/ into")
    args = parser.parse_args(argv)
    print(json.dumps(prepare_tiny_setup(args.root), indent=2))
    return 0


if __name__ == "__main__":
    host.run_main(main)
