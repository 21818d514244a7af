"""Checks of the numbers a user gives (upscale factor, LoRA strength) that need no ComfyUI, so
the command line can run them before it loads any model. The pipeline and loader use them too."""

from __future__ import annotations

import math

MAX_FACTOR = 8.0


def check_factor(factor: float) -> float:
    """`factor` as a float; ValueError unless it is a finite number in 1..MAX_FACTOR."""
    value = float(factor)
    if not (math.isfinite(value) and 1.0 <= value <= MAX_FACTOR):
        raise ValueError(f"upscale factor {factor} is outside 1..{MAX_FACTOR:g}")
    return value


def check_strength(strength: float) -> float:
    """`strength` as a float; ValueError unless it is a finite number (NaN or Inf would turn
    every patched weight, and so every output pixel, into NaN)."""
    value = float(strength)
    if not math.isfinite(value):
        raise ValueError(f"LoRA strength {strength} is not a finite number; use e.g. 1.0 (what the "
                         "weights were trained for)")
    return value
