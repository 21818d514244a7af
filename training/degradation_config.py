"""Real-ESRGAN degradation's options (training.degradation runs them): the dataclasses a
training config's ``data.realesrgan`` section fills, and their checks. No torch: the config
loader and the run lock import this without the tensor stack."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclass
class StageConfig:
    """Parameters of one degradation stage (defaults: Real-ESRGAN's first stage)."""

    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # over KERNEL_TYPES
    sinc_prob: float = 0.1
    sinc_cutoff: tuple[float, float] = (math.pi / 3, math.pi)  # kernels smaller than sinc_large_size
    sinc_cutoff_large: tuple[float, float] = (math.pi / 5, math.pi)  # kernels of sinc_large_size and up
    sinc_large_size: int = 13
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)  # generalised Gaussian shape
    betap_range: tuple[float, float] = (1.0, 2.0)  # plateau shape
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)  # down from [lo, 1), up in (1, hi]
    resize_mode_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # over RESIZE_MODES
    gaussian_noise_prob: float = 0.5  # else Poisson
    noise_range: tuple[float, float] = (1.0, 30.0)  # Gaussian sigma on the 0..255 scale
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)


def _second_stage() -> StageConfig:
    return StageConfig(
        blur_sigma=(0.2, 1.5),
        resize_probs=(0.3, 0.4, 0.3),
        resize_range=(0.3, 1.2),
        noise_range=(1.0, 25.0),
        poisson_scale_range=(0.05, 2.5),
    )


@dataclass
class DegradationConfig:
    """Everything random in the pipeline; defaults are Real-ESRGAN's x4 training options."""

    scale: int = 4
    kernel_size_max: int = 21  # kernels are odd sizes 7..kernel_size_max, padded to it
    kernel_size_min: int = 7
    first: StageConfig = field(default_factory=StageConfig)
    second: StageConfig = field(default_factory=_second_stage)
    second_blur_prob: float = 0.8
    final_sinc_prob: float = 0.8
    final_sinc_cutoff: tuple[float, float] = (math.pi / 3, math.pi)
    final_resize_mode_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # over RESIZE_MODES
    final_jpeg_first_prob: float = 0.5  # order of the last JPEG and resize + sinc


def config_problems(cfg: DegradationConfig) -> list[str]:
    """What is wrong with `cfg` (empty when it can run): probability lists of the right length
    summing to 1, probabilities in [0, 1], ranges with low <= high, odd kernel sizes."""
    problems: list[str] = []

    def probs(name: str, value: tuple[float, ...], n: int) -> None:
        if len(value) != n or any(p < 0 for p in value) or abs(sum(value) - 1.0) > 1e-6:
            problems.append(f"{name} must be {n} non-negative probabilities summing to 1, got {list(value)}")

    def prob(name: str, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            problems.append(f"{name} must be a probability in [0, 1], got {value}")

    def span(name: str, value: tuple[float, float]) -> None:
        if len(value) != 2 or value[0] > value[1]:
            problems.append(f"{name} must be [low, high] with low <= high, got {list(value)}")

    for stage_name, stage in (("first", cfg.first), ("second", cfg.second)):
        probs(f"{stage_name}.kernel_probs", stage.kernel_probs, len(KERNEL_TYPES))
        probs(f"{stage_name}.resize_probs", stage.resize_probs, 3)
        probs(f"{stage_name}.resize_mode_probs", stage.resize_mode_probs, len(RESIZE_MODES))
        for name in ("sinc_prob", "gaussian_noise_prob", "gray_noise_prob"):
            prob(f"{stage_name}.{name}", getattr(stage, name))
        for name in ("sinc_cutoff", "sinc_cutoff_large", "blur_sigma", "betag_range", "betap_range",
                     "resize_range", "noise_range", "poisson_scale_range", "jpeg_range"):
            span(f"{stage_name}.{name}", getattr(stage, name))
    probs("final_resize_mode_probs", cfg.final_resize_mode_probs, len(RESIZE_MODES))
    for name in ("second_blur_prob", "final_sinc_prob", "final_jpeg_first_prob"):
        prob(name, getattr(cfg, name))
    span("final_sinc_cutoff", cfg.final_sinc_cutoff)
    if not (3 <= cfg.kernel_size_min <= cfg.kernel_size_max and cfg.kernel_size_min % 2 and cfg.kernel_size_max % 2):
        problems.append(f"kernel sizes must be odd with 3 <= kernel_size_min <= kernel_size_max, got "
                        f"{cfg.kernel_size_min}..{cfg.kernel_size_max}")
    return problems
