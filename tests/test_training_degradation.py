"""Real-ESRGAN second-order degradation: shapes, range, seeding, per-stage statistics; the
unsharp mask against a float64 reference and the training pair it makes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.data import training_pair
from training.degradation import (
    DegradationConfig,
    RealESRGANDegradation,
    StageConfig,
    add_gaussian_noise,
    add_poisson_noise,
    jpeg,
    random_blur_kernel,
    sinc_kernel,
    usm_sharpen,
)


def _smooth_images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images (B, 3, size, size) in [0.1, 0.9]: upsampled noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 8, size // 8, generator=gen)
    return 0.1 + 0.8 * torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)


@pytest.fixture(scope="module")
def degrade() -> RealESRGANDegradation:
    return RealESRGANDegradation()


def test_output_shape_range_and_quantisation(degrade):
    hr = _smooth_images(batch=3, size=64)
    for seed in range(4):
        lr = degrade(hr, torch.Generator().manual_seed(seed))
        assert lr.shape == (3, 3, 16, 16)
        assert lr.dtype == torch.float32
        assert lr.min().item() >= 0.0 and lr.max().item() <= 1.0
        assert torch.equal(lr * 255, (lr * 255).round())
        # still the same picture: low-passed HR and LR agree on average brightness
        assert (lr.mean() - hr.mean()).abs().item() < 0.1


def test_same_seed_same_output_and_other_seed_differs(degrade):
    hr = _smooth_images(batch=2, size=64)
    a = degrade(hr, torch.Generator().manual_seed(7))
    b = degrade(hr, torch.Generator().manual_seed(7))
    c = degrade(hr, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_without_generator_the_global_seed_decides(degrade):
    hr = _smooth_images(batch=1, size=32)
    torch.manual_seed(11)
    a = degrade(hr)
    torch.manual_seed(11)
    b = degrade(hr)
    c = degrade(hr)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_rejects_sizes_not_divisible_by_scale(degrade):
    with pytest.raises(ValueError, match="divisible"):
        degrade(torch.rand(1, 3, 30, 32))


@pytest.mark.parametrize("sigma_255", [5.0, 20.0])
def test_gaussian_noise_sigma_on_a_flat_image(sigma_255):
    flat = torch.full((2, 3, 128, 128), 0.5)
    gray = torch.tensor([False, True])
    noisy = add_gaussian_noise(flat, torch.full((2,), sigma_255 / 255), gray, torch.Generator().manual_seed(0))
    measured = (noisy - flat).std(dim=(1, 2, 3)) * 255
    assert torch.all((measured - sigma_255).abs() < 0.1 * sigma_255), measured
    # grey noise is identical in all channels, colour noise is not
    assert torch.equal(noisy[1, 0], noisy[1, 2])
    assert not torch.equal(noisy[0, 0], noisy[0, 2])


def test_noise_stage_of_the_pipeline_follows_its_config():
    """Only the first noise stage active (no blur, resize; JPEG at quality 100): sigma as
    configured. Grey noise, since JPEG's 4:2:0 chroma subsampling averages colour noise."""
    sigma = 12.0
    first = StageConfig(
        kernel_probs=(1, 0, 0, 0, 0, 0), blur_sigma=(1e-3, 1e-3), sinc_prob=0.0,
        resize_probs=(0, 0, 1), gaussian_noise_prob=1.0, noise_range=(sigma, sigma), gray_noise_prob=1.0,
        jpeg_range=(100, 100),
    )
    quiet = StageConfig(
        kernel_probs=(1, 0, 0, 0, 0, 0), blur_sigma=(1e-3, 1e-3), sinc_prob=0.0,
        resize_probs=(0, 0, 1), gaussian_noise_prob=1.0, noise_range=(0, 0), jpeg_range=(100, 100),
    )
    cfg = DegradationConfig(
        scale=1, first=first, second=quiet, second_blur_prob=0.0, final_sinc_prob=0.0
    )
    flat = torch.full((2, 3, 64, 64), 0.5)
    lr = RealESRGANDegradation(cfg)(flat, torch.Generator().manual_seed(3))
    measured = (lr - 0.5).std().item() * 255
    # JPEG at quality 100 and 8-bit rounding add well under 10 % here
    assert abs(measured - sigma) < 0.1 * sigma, measured


def test_poisson_noise_grows_with_scale_and_brightness():
    gen = torch.Generator().manual_seed(0)
    dark, bright = torch.full((1, 3, 96, 96), 0.1), torch.full((1, 3, 96, 96), 0.8)
    no_gray = torch.tensor([False])
    small = (add_poisson_noise(bright, torch.tensor([0.5]), no_gray, gen) - bright).std()
    large = (add_poisson_noise(bright, torch.tensor([2.0]), no_gray, gen) - bright).std()
    darker = (add_poisson_noise(dark, torch.tensor([2.0]), no_gray, gen) - dark).std()
    assert 0 < small < large
    assert darker < large


def test_jpeg_error_is_monotone_in_quality():
    images = _smooth_images(batch=1, size=64, seed=1)
    images = images + 0.05 * torch.rand(images.shape, generator=torch.Generator().manual_seed(2))
    errors = [
        (jpeg(images, torch.tensor([float(q)])) - images.clamp(0, 1)).square().mean().item()
        for q in (10, 30, 50, 70, 90)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_blur_kernels_are_normalised_and_sized():
    gen = torch.Generator().manual_seed(0)
    cfg = DegradationConfig()
    for _ in range(30):
        kernel = random_blur_kernel(gen, cfg.first, cfg)
        assert kernel.shape == (21, 21)
        assert abs(kernel.sum().item() - 1) < 1e-9
        assert kernel.min().item() >= -0.05  # sinc kernels may dip slightly below zero
        # centred: first moments are zero only for symmetric kernels; all of ours are point-symmetric
        flipped = torch.flip(kernel, dims=(0, 1))
        torch.testing.assert_close(kernel, flipped, atol=1e-12, rtol=0)


def test_isotropic_gaussian_kernel_has_the_requested_sigma():
    stage = StageConfig(kernel_probs=(1, 0, 0, 0, 0, 0), sinc_prob=0.0, blur_sigma=(2.0, 2.0))
    cfg = DegradationConfig(kernel_size_min=21)
    kernel = random_blur_kernel(torch.Generator().manual_seed(0), stage, cfg)
    ax = torch.arange(21, dtype=torch.float64) - 10
    variance_x = (kernel.sum(0) * ax**2).sum().item()
    assert abs(math.sqrt(variance_x) - 2.0) < 0.02


def test_sinc_kernel_centre_value():
    kernel = sinc_kernel(21, math.pi / 2)
    assert kernel.argmax().item() == 10 * 21 + 10
    assert abs(kernel.sum().item() - 1) < 1e-12


def test_usm_sharpening_raises_edge_contrast_and_leaves_flat_areas():
    step = torch.full((1, 3, 64, 64), 0.3)
    step[..., 32:] = 0.7
    sharp = usm_sharpen(step)
    assert sharp.min().item() >= 0 and sharp.max().item() <= 1
    # overshoot next to the edge, nothing far from it
    assert sharp[0, 0, 5, 33].item() > 0.7 + 0.02 and sharp[0, 0, 5, 30].item() < 0.3 - 0.02
    torch.testing.assert_close(sharp[..., :2], step[..., :2], atol=1e-3, rtol=0)
    flat = torch.full((1, 3, 40, 40), 0.5)
    torch.testing.assert_close(usm_sharpen(flat), flat)


def test_resize_mode_probabilities_choose_the_interpolation():
    """Same seed: every resize area vs every resize bicubic gives a different LR. The
    probabilities are weights, and equal ones reproduce the default config's output."""
    hr = _smooth_images(batch=2, size=64)

    def run(probs: tuple[float, float, float]) -> torch.Tensor:
        stage, second = StageConfig(resize_mode_probs=probs), DegradationConfig().second
        second.resize_mode_probs = probs
        cfg = DegradationConfig(first=stage, second=second, final_resize_mode_probs=probs)
        return RealESRGANDegradation(cfg)(hr, torch.Generator().manual_seed(5))

    area = run((1, 0, 0))
    assert not torch.equal(area, run((0, 0, 1)))
    assert torch.equal(area, run((0.7, 0, 0)))
    assert torch.equal(run((1, 1, 1)), RealESRGANDegradation()(hr, torch.Generator().manual_seed(5)))


def test_sinc_cutoff_ranges_and_size_threshold_come_from_the_config():
    cfg = DegradationConfig(kernel_size_min=7, kernel_size_max=7)
    stage = StageConfig(sinc_prob=1.0, sinc_cutoff=(1.0, 1.0), sinc_cutoff_large=(2.0, 2.0), sinc_large_size=9)
    torch.testing.assert_close(random_blur_kernel(torch.Generator(), stage, cfg), sinc_kernel(7, 1.0))
    stage.sinc_large_size = 7
    torch.testing.assert_close(random_blur_kernel(torch.Generator(), stage, cfg), sinc_kernel(7, 2.0))


def test_usm_weight_threshold_and_radius():
    step = torch.full((1, 3, 64, 64), 0.3)
    step[..., 32:] = 0.7
    # nothing passes a threshold above the largest residual
    torch.testing.assert_close(usm_sharpen(step, threshold=255.0), step)
    # a smaller radius leaves pixels 12 columns from the edge alone, the default does not
    assert abs(usm_sharpen(step, radius=9)[0, 0, 5, 44].item() - 0.7) < 1e-4
    assert usm_sharpen(step)[0, 0, 5, 44].item() > 0.7 + 1e-3
    # the training pair passes its usm_* arguments on
    hr = _textured_images()
    degrade = RealESRGANDegradation()
    default = training_pair(hr, degrade, torch.Generator().manual_seed(0))
    stronger = training_pair(hr, degrade, torch.Generator().manual_seed(0), usm_weight=2.0)
    assert not torch.equal(default[0], stronger[0]) and not torch.equal(default[1], stronger[1])


def _textured_images(batch: int = 2, size: int = 64, seed: int = 4) -> torch.Tensor:
    """(B, 3, size, size) in [0.1, 0.9] with edges every 8 pixels: bilinear upsampling of an
    8x8 grid of random values, so the unsharp mask's threshold is passed in most places."""
    coarse = torch.rand(batch, 3, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))
    return 0.1 + 0.8 * torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")


def usm_reference(images: torch.Tensor, weight: float = 0.5, threshold: float = 10.0, size: int = 51) -> torch.Tensor:
    """Real-ESRGAN's unsharp mask (USMSharp) written independently in float64 numpy: a separable
    Gaussian of `size` with OpenCV's sigma for that size (0.3 ((size - 1) / 2 - 1) + 0.8 = 8 for
    51), reflect padding without repeating the edge (images larger than size // 2);
    out = soft * clip(I + weight (I - blur(I))) + (1 - soft) * I with soft = blur(|I - blur(I)|
    * 255 > threshold). (B, C, H, W) in [0, 1] -> float64 of the same shape."""
    img = images.double().numpy()
    sigma = 0.3 * ((size - 1) / 2 - 1) + 0.8
    x = np.arange(size) - size // 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    h, w, p = img.shape[-2], img.shape[-1], size // 2

    def blur(a: np.ndarray) -> np.ndarray:
        a = np.pad(a, ((0, 0), (0, 0), (p, p), (p, p)), mode="reflect")
        a = sum(k[i] * a[:, :, i:i + h, :] for i in range(size))
        return sum(k[i] * a[:, :, :, i:i + w] for i in range(size))

    residual = img - blur(img)
    soft = blur((np.abs(residual) * 255 > threshold).astype(np.float64))
    sharp = np.clip(img + weight * residual, 0, 1)
    return torch.from_numpy(soft * sharp + (1 - soft) * img)


def test_usm_matches_the_float64_reference():
    hr = _textured_images()
    ref = usm_reference(hr)
    # a pixel whose float32 residual falls on the other side of the threshold moves its
    # neighbours' soft mask by at most one kernel weight (1 / (2 pi 64)) times their
    # |sharp - I| (<= 0.1 here): 1e-3 absorbs a few such flips; sharpening itself is 30x that
    assert float((ref - hr.double()).abs().max()) > 0.03
    assert float((usm_sharpen(hr).double() - ref).abs().max()) <= 1e-3


def test_the_pipeline_itself_does_not_sharpen():
    # Real-ESRGAN degrades an unsharp-masked HR; here that is the training pair's step, so the
    # pipeline with every stage near identity (scale 1, a 1e-3 px blur, no resize, no noise,
    # grey images through JPEG at quality 100) returns the input, with no overshoot at the edges.
    quiet = StageConfig(kernel_probs=(1, 0, 0, 0, 0, 0), blur_sigma=(1e-3, 1e-3), sinc_prob=0.0,
                        resize_probs=(0, 0, 1), gaussian_noise_prob=1.0, noise_range=(0, 0),
                        jpeg_range=(100, 100))
    cfg = DegradationConfig(scale=1, first=quiet, second=quiet, second_blur_prob=0.0, final_sinc_prob=0.0)
    step = torch.full((1, 3, 64, 64), 0.3)
    step[..., 32:] = 0.7
    out = RealESRGANDegradation(cfg)(step, torch.Generator().manual_seed(0))
    assert float((out - step).abs().max()) < 0.01
    assert float((usm_sharpen(step) - step).abs().max()) > 0.05   # what a sharpening pipeline adds


def test_training_pair_follows_the_usm_convention():
    # sharpened (Real-ESRGAN's convention): target = unsharp-masked HR (the float64 reference),
    # LR degraded from that target; none (OSEDiff's): target = HR, LR degraded from the HR.
    hr = _textured_images()
    degrade = RealESRGANDegradation()
    target, lr = training_pair(hr, degrade, torch.Generator().manual_seed(3), "sharpened")
    ref = usm_reference(hr)
    assert float((ref - hr.double()).abs().max()) > 0.03          # the plain HR is not the target
    assert float((target.double() - ref).abs().max()) <= 1e-3
    assert torch.equal(lr, degrade(target, torch.Generator().manual_seed(3)))
    assert not torch.equal(lr, degrade(hr, torch.Generator().manual_seed(3)))
    target, lr = training_pair(hr, degrade, torch.Generator().manual_seed(3), "none")
    assert torch.equal(target, hr)
    assert torch.equal(lr, degrade(hr, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="usm_target 'blurred' is not one of sharpened/none"):
        training_pair(hr, degrade, torch.Generator(), "blurred")
