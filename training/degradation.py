"""Real-ESRGAN's second-order degradation (Wang et al. 2021), batched in torch.

HR (B, 3, H, W) in [0, 1] -> LR (B, 3, H / scale, W / scale) in [0, 1], quantised to
multiples of 1/255. Stages, with Real-ESRGAN's default parameters (``DegradationConfig``):

0. (not here) unsharp masking: Real-ESRGAN degrades an unsharp-masked HR. This pipeline
   does not sharpen: ``usm_sharpen`` is a separate step, so that a training loop sharpens the
   HR once and makes the LR from the very image its losses target (training.data.training_pair;
   Real-ESRGAN's full recipe is ``degrade(usm_sharpen(hr))``);
1. blur with a per-sample random kernel (iso / aniso Gaussian, generalised Gaussian,
   plateau, or with ``sinc_prob`` a sinc low-pass), kernel size odd in [7, 21], padded to 21;
   sinc cutoff in [pi/3, pi] below size 13, else in [pi/5, pi];
2. random resize (up / down / keep; area, bilinear or bicubic, uniformly);
3. Gaussian noise (sigma in 1..30 on the 0..255 scale) or Poisson noise, each with a
   per-sample probability of being grey (the same noise in all channels); clip to [0, 1];
4. JPEG with per-sample quality in [30, 95];
5. second stage: blur with probability ``second_blur_prob``, resize, noise, with the
   second stage's ranges;
6. final: [resize to H/scale + final sinc filter (probability 0.8), then JPEG] or
   [JPEG, then resize + sinc], each order with probability 0.5; clamp and round. The final
   sinc cutoff is in [pi/3, pi] at any size.

As in Real-ESRGAN, kernels, noise levels, grey-noise choices and JPEG qualities are drawn
per sample, while the resize scale, interpolation mode, noise type (Gaussian or Poisson)
and the final order are drawn once per batch (a batch must keep one size).

Randomness: every scalar is drawn from one CPU ``torch.Generator`` (so a seed gives the
same choices on any device); noise images come from a generator on the image's device,
seeded from the CPU one. Same seed + same device -> identical output.

Pieces: kornia's ``filter2d`` (per-sample kernels, reflect padding) and
``jpeg_codec_differentiable`` (a torch DCT JPEG). Resizing calls ``F.interpolate`` directly,
as Real-ESRGAN does: the first stage with the drawn scale factor (kornia's ``rescale`` also
takes a factor, but turns it into an output size first, so it would sample at the rounded
size's ratio instead of the factor), the second stage and the final resize with sizes.
"""

from __future__ import annotations

import math

import kornia
import torch
from torch.nn import functional as F

from .degradation_config import KERNEL_TYPES, RESIZE_MODES, DegradationConfig, StageConfig

__all__ = [
    "DegradationConfig",
    "RealESRGANDegradation",
    "StageConfig",
    "add_gaussian_noise",
    "add_poisson_noise",
    "jpeg",
    "random_blur_kernel",
    "sinc_kernel",
    "usm_sharpen",
]

# ----------------------------------------------------------------------------------------
# Random numbers
# ----------------------------------------------------------------------------------------


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _choice(gen: torch.Generator, probs: tuple[float, ...]) -> int:
    return int(torch.multinomial(torch.tensor(probs, dtype=torch.float64), 1, generator=gen))


def _resize_mode(gen: torch.Generator, probs: tuple[float, float, float]) -> str:
    """A mode of RESIZE_MODES drawn with ``probs``. Equal probabilities use a uniform integer
    draw, which keeps the random stream (and outputs) of the default config unchanged."""
    if len(set(probs)) == 1:
        return RESIZE_MODES[int(torch.randint(len(RESIZE_MODES), (), generator=gen))]
    return RESIZE_MODES[_choice(gen, probs)]


# ----------------------------------------------------------------------------------------
# Kernels (all (k, k) float64, sum 1)
# ----------------------------------------------------------------------------------------


def _grid(size: int) -> torch.Tensor:
    """(size, size, 2) integer offsets (x, y) from the kernel centre."""
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def _mahalanobis_sq(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """x^T Sigma^-1 x over the grid, Sigma = R diag(sx^2, sy^2) R^T, R a rotation by theta."""
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rot.T
    grid = _grid(size)
    return ((grid @ torch.linalg.inv(cov)) * grid).sum(-1)


def _normalised(kernel: torch.Tensor) -> torch.Tensor:
    return kernel / kernel.sum()


def sinc_kernel(size: int, cutoff: float) -> torch.Tensor:
    """Circular low-pass (2-D sinc / Airy) kernel: cutoff J1(cutoff r) / (2 pi r), sum 1."""
    r = _grid(size).norm(dim=-1)
    safe_r = torch.where(r == 0, torch.ones_like(r), r)
    kernel = cutoff * torch.special.bessel_j1(cutoff * safe_r) / (2 * math.pi * safe_r)
    kernel = torch.where(r == 0, torch.full_like(r, cutoff**2 / (4 * math.pi)), kernel)
    return _normalised(kernel)


def _pad_to(kernel: torch.Tensor, size: int) -> torch.Tensor:
    pad = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, (pad, pad, pad, pad))


def _shape_beta(gen: torch.Generator, beta_range: tuple[float, float]) -> float:
    """Real-ESRGAN's shape draw: half the time in [lo, 1), half in [1, hi]."""
    if float(torch.rand((), generator=gen)) < 0.5:
        return _uniform(gen, beta_range[0], 1.0)
    return _uniform(gen, 1.0, beta_range[1])


def random_blur_kernel(gen: torch.Generator, stage: StageConfig, cfg: DegradationConfig) -> torch.Tensor:
    """One random stage kernel, (cfg.kernel_size_max,)*2 float64, sum 1."""
    size = 2 * int(torch.randint(cfg.kernel_size_min // 2, cfg.kernel_size_max // 2 + 1, (), generator=gen)) + 1
    if float(torch.rand((), generator=gen)) < stage.sinc_prob:
        cutoff = stage.sinc_cutoff if size < stage.sinc_large_size else stage.sinc_cutoff_large
        return _pad_to(sinc_kernel(size, _uniform(gen, *cutoff)), cfg.kernel_size_max)
    kind = KERNEL_TYPES[_choice(gen, stage.kernel_probs)]
    sigma_x = _uniform(gen, *stage.blur_sigma)
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = _uniform(gen, *stage.blur_sigma), _uniform(gen, -math.pi, math.pi)
    d2 = _mahalanobis_sq(size, sigma_x, sigma_y, theta)
    if kind.startswith("generalized"):
        kernel = torch.exp(-0.5 * d2.pow(_shape_beta(gen, stage.betag_range)))
    elif kind.startswith("plateau"):
        kernel = 1.0 / (d2.pow(_shape_beta(gen, stage.betap_range)) + 1.0)
    else:
        kernel = torch.exp(-0.5 * d2)
    return _pad_to(_normalised(kernel), cfg.kernel_size_max)


def _final_kernel(gen: torch.Generator, cfg: DegradationConfig) -> torch.Tensor:
    if float(torch.rand((), generator=gen)) < cfg.final_sinc_prob:
        size = 2 * int(torch.randint(cfg.kernel_size_min // 2, cfg.kernel_size_max // 2 + 1, (), generator=gen)) + 1
        return _pad_to(sinc_kernel(size, _uniform(gen, *cfg.final_sinc_cutoff)), cfg.kernel_size_max)
    pulse = torch.zeros(cfg.kernel_size_max, cfg.kernel_size_max, dtype=torch.float64)
    pulse[cfg.kernel_size_max // 2, cfg.kernel_size_max // 2] = 1.0
    return pulse


# ----------------------------------------------------------------------------------------
# Image operations (images (B, C, H, W) in [0, 1])
# ----------------------------------------------------------------------------------------


def _blur(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample filtering with (B, k, k) kernels, reflect padding (replicate for images
    too small to reflect k // 2 pixels, e.g. tiny test crops after a strong down-resize)."""
    half = kernels.shape[-1] // 2
    border = "reflect" if min(images.shape[-2:]) > half else "replicate"
    return kornia.filters.filter2d(images, kernels.to(images), border_type=border)


def add_gaussian_noise(
    images: torch.Tensor, sigma: torch.Tensor, gray: torch.Tensor, gen: torch.Generator | None = None
) -> torch.Tensor:
    """images + N(0, sigma^2), sigma (B,) on the [0, 1] scale; gray (B,) bool: one noise
    image shared by the channels. Clipped to [0, 1]."""
    b, c, h, w = images.shape
    colour = torch.randn(images.shape, generator=gen, device=images.device, dtype=images.dtype)
    mono = torch.randn((b, 1, h, w), generator=gen, device=images.device, dtype=images.dtype).expand(b, c, h, w)
    noise = torch.where(gray.view(b, 1, 1, 1).to(images.device), mono, colour)
    return (images + noise * sigma.view(b, 1, 1, 1).to(images)).clamp(0, 1)


def _poisson_noise(images: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Shot noise of images quantised to 8 bits, at 2^ceil(log2(#levels)) photons per unit."""
    quantised = (images * 255).round().clamp(0, 255) / 255
    b = images.shape[0]
    levels = torch.tensor([torch.unique(quantised[i]).numel() for i in range(b)], device=images.device)
    photons = (2 ** torch.ceil(torch.log2(levels.to(images.dtype)))).view(b, 1, 1, 1)
    counts = torch.poisson(quantised * photons, generator=gen)
    return counts / photons - quantised


def add_poisson_noise(
    images: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor, gen: torch.Generator | None = None
) -> torch.Tensor:
    """images + scale * Poisson noise (Real-ESRGAN's); gray (B,) bool: noise of the BT.601
    grey image in all channels. scale (B,). Clipped to [0, 1]."""
    b, c, h, w = images.shape
    colour = _poisson_noise(images, gen)
    grey = kornia.color.rgb_to_grayscale(images) if c == 3 else images[:, :1]
    mono = _poisson_noise(grey, gen).expand(b, c, h, w)
    noise = torch.where(gray.view(b, 1, 1, 1).to(images.device), mono, colour)
    return (images + noise * scale.view(b, 1, 1, 1).to(images)).clamp(0, 1)


def jpeg(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG encode-decode with per-sample quality (B,) in [1, 100]; input clamped to [0, 1]."""
    quality = quality.to(device=images.device, dtype=torch.float32)
    return kornia.enhance.jpeg_codec_differentiable(images.clamp(0, 1).float(), quality).to(images.dtype)


def usm_sharpen(images: torch.Tensor, weight: float = 0.5, threshold: float = 10.0, radius: int = 50) -> torch.Tensor:
    """Real-ESRGAN's unsharp mask: a Gaussian of size ``radius`` made odd (50 -> 51) with the
    sigma OpenCV derives from the size (51 -> 8); sharpened = clamp(I + weight (I - blur(I))),
    blended in where |I - blur(I)| * 255 > threshold, with that mask softened by the same blur.
    (B, C, H, W) in [0, 1] -> same."""
    size = radius | 1
    sigma = 0.3 * ((size - 1) / 2 - 1) + 0.8
    border = "reflect" if min(images.shape[-2:]) > size // 2 else "replicate"
    blur = kornia.filters.gaussian_blur2d(images, (size, size), (sigma, sigma), border_type=border)
    residual = images - blur
    mask = (residual.abs() * 255 > threshold).to(images.dtype)
    soft = kornia.filters.gaussian_blur2d(mask, (size, size), (sigma, sigma), border_type=border)
    sharp = (images + weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * images


# ----------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------


class RealESRGANDegradation:
    """Callable: ``degrade(hr, generator)`` -> LR. See the module docstring."""

    def __init__(self, config: DegradationConfig | None = None) -> None:
        self.config = config or DegradationConfig()

    def _resize(self, images: torch.Tensor, gen: torch.Generator, stage: StageConfig) -> torch.Tensor:
        direction = _choice(gen, stage.resize_probs)
        if direction == 0:
            factor = _uniform(gen, 1.0, stage.resize_range[1])
        elif direction == 1:
            factor = _uniform(gen, stage.resize_range[0], 1.0)
        else:
            factor = 1.0
        return F.interpolate(images, scale_factor=factor, mode=_resize_mode(gen, stage.resize_mode_probs))

    def _resize_to(
        self, images: torch.Tensor, gen: torch.Generator, size: tuple[int, int], mode_probs: tuple[float, float, float]
    ) -> torch.Tensor:
        return F.interpolate(images, size=size, mode=_resize_mode(gen, mode_probs))

    def _noise(self, images: torch.Tensor, gen: torch.Generator, dev_gen, stage: StageConfig) -> torch.Tensor:
        b = images.shape[0]
        gray = torch.rand(b, generator=gen) < stage.gray_noise_prob
        if float(torch.rand((), generator=gen)) < stage.gaussian_noise_prob:
            lo, hi = stage.noise_range
            sigma = (lo + (hi - lo) * torch.rand(b, generator=gen, dtype=torch.float64)) / 255.0
            return add_gaussian_noise(images, sigma.float(), gray, dev_gen)
        lo, hi = stage.poisson_scale_range
        scale = lo + (hi - lo) * torch.rand(b, generator=gen, dtype=torch.float64)
        return add_poisson_noise(images, scale.float(), gray, dev_gen)

    def _jpeg(self, images: torch.Tensor, gen: torch.Generator, stage: StageConfig) -> torch.Tensor:
        lo, hi = stage.jpeg_range
        quality = lo + (hi - lo) * torch.rand(images.shape[0], generator=gen, dtype=torch.float64)
        return jpeg(images, quality)

    def __call__(self, hr: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W divisible by scale -> (B, 3, H/scale, W/scale).

        ``generator``: a CPU torch.Generator; None draws its seed from torch's global RNG.
        """
        cfg = self.config
        if hr.ndim != 4 or hr.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(hr.shape)}")
        b, _, h, w = hr.shape
        if h % cfg.scale or w % cfg.scale:
            raise ValueError(f"H and W ({h}, {w}) must be divisible by scale {cfg.scale}")
        if generator is None:  # follow torch's global seed (torch.manual_seed)
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        gen = generator
        if gen.device.type != "cpu":
            raise ValueError("pass a CPU torch.Generator; noise images use a device generator seeded from it")
        dev_gen = torch.Generator(device=hr.device)
        dev_gen.manual_seed(int(torch.randint(2**62, (), generator=gen)))
        out = hr.float()  # sharpening, if any, is the caller's (usm_sharpen, see the module docstring)

        # First order.
        kernels = torch.stack([random_blur_kernel(gen, cfg.first, cfg) for _ in range(b)])
        out = _blur(out, kernels)
        out = self._resize(out, gen, cfg.first)
        out = self._noise(out, gen, dev_gen, cfg.first)
        out = self._jpeg(out, gen, cfg.first)

        # Second order.
        kernels = torch.stack([random_blur_kernel(gen, cfg.second, cfg) for _ in range(b)])
        if float(torch.rand((), generator=gen)) < cfg.second_blur_prob:
            out = _blur(out, kernels)
        direction = _choice(gen, cfg.second.resize_probs)
        lo, hi = cfg.second.resize_range
        factor = _uniform(gen, 1.0, hi) if direction == 0 else _uniform(gen, lo, 1.0) if direction == 1 else 1.0
        size = (int(h / cfg.scale * factor), int(w / cfg.scale * factor))
        out = self._resize_to(out, gen, size, cfg.second.resize_mode_probs)
        out = self._noise(out, gen, dev_gen, cfg.second)

        # Final resize + sinc and JPEG, in random order.
        final = torch.stack([_final_kernel(gen, cfg) for _ in range(b)])
        lr_size = (h // cfg.scale, w // cfg.scale)
        if float(torch.rand((), generator=gen)) < cfg.final_jpeg_first_prob:
            out = self._jpeg(out, gen, cfg.second)
            out = _blur(self._resize_to(out, gen, lr_size, cfg.final_resize_mode_probs), final)
        else:
            out = _blur(self._resize_to(out, gen, lr_size, cfg.final_resize_mode_probs), final)
            out = self._jpeg(out, gen, cfg.second)
        return (out * 255).round().clamp(0, 255) / 255
