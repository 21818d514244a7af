"""D3SRUpscale's math against an independent plain implementation of D3SR.md's formulas."""

from __future__ import annotations

import pytest
import torch
from reference_d3sr import d3sr_reference, merged_unet, raw_vae
from safetensors import safe_open
from safetensors.torch import save_file

from d3sr_core import pipeline
from d3sr_core.model import load_d3sr
from d3sr_core.upscale import upscale
from d3sr_core.weight_format import WeightFileError, read_weights, write_weights
from devtools import synthetic

TOL = 1e-4  # float32, CPU


@pytest.fixture(scope="module")
def raw_modules(models_dir):
    ckpt = str(models_dir / "checkpoints" / "tiny-sd2.safetensors")
    return ckpt, raw_vae(ckpt)


@pytest.mark.parametrize("timestep", [399, 250])
def test_upscale_matches_plain_formula(tiny_sd2, models_dir, raw_modules, timestep):
    model, vae = tiny_sd2
    path = str(models_dir / "d3sr" / f"tiny-t{timestep}.safetensors")
    weights = read_weights(path)
    assert weights.timestep == timestep
    d3sr = load_d3sr(model, vae, path, strength=1.0)

    gen = torch.Generator().manual_seed(timestep)
    lr = torch.rand(2, 7, 9, 3, generator=gen)         # odd size (padded for VAE and UNet), batch of 2
    out = upscale(d3sr, lr, 4.0, "none")
    assert out.shape == (2, 28, 36, 3)

    ckpt, vae_raw = raw_modules
    unet = merged_unet(ckpt, synthetic.TINY_SD2_UNET_CONFIG, weights.lora)
    ref = d3sr_reference(unet, vae_raw, lr.movedim(-1, 1), 4.0, timestep, weights.text_embedding)
    err = (out.movedim(-1, 1) - ref).abs().max().item()
    assert err < TOL, f"max abs difference {err}"
    # The LoRA must matter: without it the output differs clearly.
    plain = merged_unet(ckpt, synthetic.TINY_SD2_UNET_CONFIG, {})
    no_lora = d3sr_reference(plain, vae_raw, lr.movedim(-1, 1), 4.0, timestep, weights.text_embedding)
    assert (no_lora - ref).abs().max().item() > 100 * TOL


def test_strength_scales_the_lora(tiny_sd2, models_dir, raw_modules):
    model, vae = tiny_sd2
    path = str(models_dir / "d3sr" / "tiny-t399.safetensors")
    weights = read_weights(path)
    d3sr = load_d3sr(model, vae, path, strength=0.5)
    lr = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(5))
    out = upscale(d3sr, lr, 2.0, "none")
    ckpt, vae_raw = raw_modules
    unet = merged_unet(ckpt, synthetic.TINY_SD2_UNET_CONFIG, weights.lora, strength=0.5)
    ref = d3sr_reference(unet, vae_raw, lr.movedim(-1, 1), 2.0, 399, weights.text_embedding)
    assert (out.movedim(-1, 1) - ref).abs().max().item() < TOL


def test_loader_leaves_users_model_untouched(tiny_sd2, models_dir):
    model, vae = tiny_sd2
    before = len(model.patches)
    d3sr = load_d3sr(model, vae, str(models_dir / "d3sr" / "tiny-t399.safetensors"))
    assert len(model.patches) == before
    assert len(d3sr.model.patches) == len(read_weights(
        str(models_dir / "d3sr" / "tiny-t399.safetensors")).lora)


@pytest.mark.parametrize("size,factor", [((1, 1), 4.0), ((7, 30), 2.5), ((33, 17), 1.0),
                                         ((6, 5), 8.0)])
def test_output_size_is_exact(tiny_sd2, models_dir, size, factor):
    model, vae = tiny_sd2
    d3sr = load_d3sr(model, vae, str(models_dir / "d3sr" / "tiny-t399.safetensors"))
    out = upscale(d3sr, torch.rand(1, *size, 3), factor, "adain")
    assert out.shape == (1, round(size[0] * factor), round(size[1] * factor), 3)
    assert 0.0 <= out.min().item() and out.max().item() <= 1.0


def test_stock_lora_loader_patches_the_same_weights(tiny_sd2, models_dir):
    """ComfyUI's LoraLoaderModelOnly on the same file gives the same patched weights."""
    import comfy.lora
    import folder_paths

    import nodes
    model, vae = tiny_sd2
    folder_paths.add_model_folder_path("loras", str(models_dir / "loras"))
    (stock,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "tiny-t399.safetensors", 0.7)
    ours = load_d3sr(model, vae, str(models_dir / "d3sr" / "tiny-t399.safetensors"), 0.7).model
    assert set(stock.patches) == set(ours.patches) and len(ours.patches) > 0
    state = model.model.state_dict()
    for key in ours.patches:
        w = state[key].float()
        a = comfy.lora.calculate_weight(stock.patches[key], w.clone(), key)
        b = comfy.lora.calculate_weight(ours.patches[key], w.clone(), key)
        assert torch.equal(a, b), key
        assert not torch.equal(a, w), f"{key} was not changed by the LoRA"


def test_only_the_vae_multiple_is_padded(tiny_sd2, models_dir, monkeypatch):
    """The UNet runs on the latent of the image padded to 8 px only: 52 x 76 -> 56 x 80 -> 7 x 10
    (the tiny UNet halves once, so 7 is odd there; ComfyUI's upsamplers take the skip's shape)."""
    model, vae = tiny_sd2
    d3sr = load_d3sr(model, vae, str(models_dir / "d3sr" / "tiny-t399.safetensors"))
    seen, real = [], pipeline.predict_x0

    def spy(base_model, z, *args, **kwargs):
        seen.append(tuple(z.shape[-2:]))
        return real(base_model, z, *args, **kwargs)

    monkeypatch.setattr(pipeline, "predict_x0", spy)
    out = upscale(d3sr, torch.rand(1, 13, 19, 3), 4.0, "none")
    assert out.shape == (1, 52, 76, 3) and seen == [(7, 10)]
    assert pipeline.pixel_multiple(d3sr.model.model) == 16       # what it used to pad to


def test_upsampler_metadata_selects_the_bicubic(tiny_sd2, models_dir, raw_modules, tmp_path):
    """metadata upsampler: absent = torch's bicubic (as before the key existed); pillow-bicubic =
    Pillow's, checked against Pillow itself; an unknown value is refused."""
    model, vae = tiny_sd2
    src = str(models_dir / "d3sr" / "tiny-t399.safetensors")
    weights = read_weights(src)
    assert weights.upsampler == "torch-bicubic"
    assert load_d3sr(model, vae, src).upsampler == "torch-bicubic"
    weights.upsampler = "pillow-bicubic"
    path = str(tmp_path / "pillow.safetensors")
    write_weights(path, weights)
    d3sr = load_d3sr(model, vae, path)
    assert d3sr.upsampler == "pillow-bicubic" and not d3sr.osediff_steps
    lr = torch.rand(1, 11, 13, 3, generator=torch.Generator().manual_seed(7))
    out = upscale(d3sr, lr, 4.0, "none")
    assert out.shape == (1, 44, 52, 3)                            # D3SR keeps the exact size
    ckpt, vae_raw = raw_modules
    unet = merged_unet(ckpt, synthetic.TINY_SD2_UNET_CONFIG, weights.lora)
    args = (unet, vae_raw, lr.movedim(-1, 1), 4.0, 399, weights.text_embedding)
    ref = d3sr_reference(*args, upsampler="pillow")
    assert (out.movedim(-1, 1) - ref).abs().max().item() < TOL
    # The two bicubics give clearly different pictures, so the check above has teeth.
    assert (d3sr_reference(*args) - ref).abs().max().item() > 100 * TOL

    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["upsampler"] == "pillow-bicubic"
    save_file(tensors, path, metadata=dict(meta, upsampler="lanczos"))
    with pytest.raises(WeightFileError, match="metadata 'upsampler' is 'lanczos'"):
        read_weights(path)
