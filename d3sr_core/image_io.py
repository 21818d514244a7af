"""Image files <-> ComfyUI IMAGE tensors [1, H, W, 3] float32 in [0, 1] (for the CLI)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from .atomic_file import atomic_path


def load_image(path: str) -> torch.Tensor:
    """Read any PIL-readable image (EXIF rotation applied, alpha dropped, grey expanded) as RGB."""
    try:
        with Image.open(path) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)[None]


def save_png_atomic(image: torch.Tensor, path: str) -> None:
    """Write IMAGE [1, H, W, 3] as an 8-bit PNG atomically (atomic_file.atomic_path)."""
    array = (image[0].clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
