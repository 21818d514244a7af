"""D3SRModelLoader's rejections of a base model that does not fit, each with its message."""

from __future__ import annotations

import comfy.model_base
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import pytest
import torch

from d3sr_core.model import BaseModelMismatchError, load_d3sr
from d3sr_core.upscale import upscale
from devtools import synthetic


def test_sd1_checkpoint_is_rejected(models_dir):
    model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(models_dir / "checkpoints" / "tiny-sd1.safetensors"))
    with pytest.raises(BaseModelMismatchError, match="SD1.x") as e:
        load_d3sr(model, vae, str(models_dir / "d3sr" / "tiny-t399.safetensors"))
    assert "Load Checkpoint" in str(e.value)


def test_sdxl_model_is_rejected(tiny_sd2, models_dir):
    _, vae = tiny_sd2
    unet = synthetic.build_unet(synthetic.TINY_SDXL_UNET_CONFIG, seed=4)
    config = comfy.supported_models.SDXL(dict(synthetic.TINY_SDXL_UNET_CONFIG))
    base = config.get_model({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()})
    model = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(BaseModelMismatchError, match="SDXL"):
        load_d3sr(model, vae, str(models_dir / "d3sr" / "tiny-t399.safetensors"))


def test_layers_that_map_to_nothing_are_counted_and_named(tiny_sd2, models_dir):
    model, vae = tiny_sd2
    with pytest.raises(BaseModelMismatchError) as e:
        load_d3sr(model, vae, str(models_dir / "d3sr" / "other-layers.safetensors"))
    msg = str(e.value)
    assert "LoRA layers name no layer of the connected model" in msg
    assert "diffusion_model.input_blocks.3" in msg or "diffusion_model.output_blocks" in msg
    assert len(model.patches) == 0  # nothing applied


def test_v_prediction_model_is_rejected(tiny_sd2, models_dir):
    model, vae = tiny_sd2
    v_model = model.clone()
    import comfy.model_base
    original = v_model.model.model_type
    v_model.model.model_type = comfy.model_base.ModelType.V_PREDICTION
    try:
        with pytest.raises(BaseModelMismatchError, match="epsilon"):
            load_d3sr(v_model, vae, str(models_dir / "d3sr" / "tiny-t399.safetensors"))
    finally:
        v_model.model.model_type = original


@pytest.mark.parametrize("shape,expected", [((1, 16, 16, 4), "alpha channel"),
                                            ((1, 16, 16, 1), "RGB"),
                                            ((16, 16, 3), "RGB"),
                                            ((0, 16, 16, 3), "empty")])
def test_bad_images_are_rejected(tiny_sd2, models_dir, shape, expected):
    model, vae = tiny_sd2
    d3sr = load_d3sr(model, vae, str(models_dir / "d3sr" / "tiny-t399.safetensors"))
    with pytest.raises(ValueError, match=expected):
        upscale(d3sr, torch.rand(shape), 4.0)


def test_factor_out_of_range(tiny_sd2, models_dir):
    model, vae = tiny_sd2
    d3sr = load_d3sr(model, vae, str(models_dir / "d3sr" / "tiny-t399.safetensors"))
    with pytest.raises(ValueError, match="outside 1..8"):
        upscale(d3sr, torch.rand(1, 8, 8, 3), 9.0)


@pytest.mark.parametrize("sampling,zsnr,expected", [("v_prediction", False, "epsilon prediction"),
                                                    ("eps", True, "scaled-linear noise schedule"),
                                                    ("lcm", False, "epsilon prediction")])
def test_model_sampling_override_is_rejected(tiny_sd2, models_dir, sampling, zsnr, expected):
    # ComfyUI's stock ModelSamplingDiscrete node between the checkpoint and the D3SR loader would
    # change the x0 formula or the sigma <-> timestep map of the one step.
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    model, vae = tiny_sd2
    patched = ModelSamplingDiscrete().patch(model, sampling, zsnr)[0]
    with pytest.raises(BaseModelMismatchError, match=expected):
        load_d3sr(patched, vae, str(models_dir / "d3sr" / "tiny-t399.safetensors"))
    # The stock node with the default settings changes nothing and is accepted.
    same = ModelSamplingDiscrete().patch(model, "eps", False)[0]
    assert load_d3sr(same, vae, str(models_dir / "d3sr" / "tiny-t399.safetensors")).timestep == 399


def test_generated_checkpoints_are_detected_as_their_family(tiny_sd2, sd2_clip, models_dir):
    # The tests' stand-ins must be what ComfyUI's own detection says they are.
    model, vae = tiny_sd2
    assert type(model.model.model_config).__name__ == "SD20"
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    sd1, _, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(models_dir / "checkpoints" / "tiny-sd1.safetensors"), output_vae=False, output_clip=False)
    assert type(sd1.model.model_config).__name__ == "SD15"
    assert sd2_clip.tokenize("a cat") and type(sd2_clip.cond_stage_model).__name__ == "SD2ClipModel"
