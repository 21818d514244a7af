"""Number formats: the autocast and frozen-network dtypes a config asks for, and the cast the
loss code uses (float32 for half-precision values, higher precisions kept, so a float64 run,
as the tests use for exact comparisons, stays float64)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # type hints only: the metrics (training.dists) use this module without the config
    from .config import Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision(cfg: Config, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(autocast dtype or None for fp32, dtype of the frozen networks)."""
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    amp = None if p == "fp32" else DTYPES[p]
    frozen = cfg.train.frozen_dtype
    frozen_dtype = (amp or torch.float32) if frozen == "auto" else DTYPES[frozen]
    return amp, frozen_dtype


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` as float32 when it is in a lower precision (bf16, fp16, or an integer type), else as is."""
    return x if x.dtype == torch.float64 else x.float()
