"""SD's "scaled linear" noise schedule (SD2.1 and SDXL share it) and the one-step x0 formula."""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


def alphas_cumprod(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """abar_t for t = 0..999: cumprod(1 - beta_t), beta linear in sqrt-space from 0.00085 to 0.012."""
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(dtype)


def sigma_for_timestep(timestep: int) -> float:
    """The k-diffusion sigma of an integer timestep: sqrt((1 - abar) / abar)."""
    abar = float(alphas_cumprod()[int(timestep)])
    return ((1.0 - abar) / abar) ** 0.5
