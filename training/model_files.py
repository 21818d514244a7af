"""Checking the user's model files before training: which family a checkpoint's UNet is.

ComfyUI's own detection (`comfy.model_detection.detect_unet_config`) reads the UNet's shape
from the checkpoint's tensor names and shapes; here it runs on a shapes-only view (safetensors
headers, no weights read) so that a wrong file is reported in milliseconds, before anything
large is loaded.
"""

from __future__ import annotations

import os

import torch

UNET_PREFIX = "model.diffusion_model."
FAMILY_BY_CONTEXT = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


class ModelFileError(ValueError):
    """A model file given to the trainer is missing, unreadable or of the wrong family."""


def _shapes_only(path: str) -> dict[str, torch.Tensor]:
    """{name: meta tensor with the stored shape/dtype} without reading any weights."""
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open
        out = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                dtype = getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(
                    sl.get_dtype(), "float32"))
                out[k] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
        return out
    import comfy.utils
    return comfy.utils.load_torch_file(path)


def read_unet_config(path: str, role: str) -> dict:
    """The UNet config ComfyUI detects in checkpoint `path` (role names the file in errors).

    Raises ModelFileError if the file is missing, unreadable or holds no SD-family UNet.
    """
    if not path or not os.path.isfile(path):
        raise ModelFileError(f"{role} checkpoint not found: '{path}'. Set the path in the config "
                             "(models.generator / models.discriminator) to an existing file.")
    try:
        state = _shapes_only(path)
    except Exception as e:  # corrupt headers, pickles that fail, ...
        raise ModelFileError(f"{role} checkpoint '{path}' cannot be read ({type(e).__name__}: {e}); "
                             "the file is truncated or not a model checkpoint.") from None
    import comfy.model_detection
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise ModelFileError(f"{role} checkpoint '{path}' holds no UNet (no '{UNET_PREFIX}*' tensors); "
                             "give a full Stable Diffusion checkpoint (UNet + VAE), not a LoRA or a VAE.")
    try:
        config = comfy.model_detection.detect_unet_config(state, UNET_PREFIX)
    except Exception as e:
        raise ModelFileError(f"{role} checkpoint '{path}': ComfyUI cannot read its UNet layout "
                             f"({type(e).__name__}: {e}).") from None
    if not config or "context_dim" not in config:
        raise ModelFileError(f"{role} checkpoint '{path}' is not an SD-family UNet checkpoint.")
    config["_has_vae"] = any(k.startswith("first_stage_model.") for k in state)
    config["_has_text_encoder"] = any(k.startswith(("cond_stage_model.", "conditioner.embedders."))
                                      for k in state)
    return config


def family(config: dict) -> str:
    """'SD1.x', 'SD2.x', 'SDXL' or a description, from a detected UNet config."""
    ctx = config.get("context_dim")
    if ctx == 2048 and config.get("adm_in_channels") == 2816:
        return "SDXL"
    return FAMILY_BY_CONTEXT.get(ctx, f"an unknown model (context width {ctx})")


def check_generator_file(path: str) -> dict:
    """Raise ModelFileError unless `path` is an SD2.x checkpoint with a VAE (SD2.1-base)."""
    config = read_unet_config(path, "generator (SD2.1-base)")
    fam = family(config)
    if fam != "SD2.x":
        hint = (" It looks like the SDXL file: that one belongs in models.discriminator."
                if fam == "SDXL" else "")
        raise ModelFileError(f"generator checkpoint '{path}' is {fam}, but D3SR's generator is "
                             f"Stable Diffusion 2.1-base (context width 1024).{hint}")
    if not config["_has_vae"]:
        raise ModelFileError(f"generator checkpoint '{path}' has no VAE (first_stage_model.*); use the "
                             "full SD2.1-base checkpoint (v2-1_512-ema-pruned.safetensors).")
    return config


def check_discriminator_file(path: str) -> dict:
    """Raise ModelFileError unless `path` holds an SDXL-shaped UNet (context 2048, adm 2816)."""
    config = read_unet_config(path, "discriminator (SDXL-base)")
    fam = family(config)
    if fam != "SDXL":
        hint = (" It looks like the SD2.1 file: that one belongs in models.generator."
                if fam == "SD2.x" else "")
        raise ModelFileError(f"discriminator checkpoint '{path}' is {fam}, but D3SR's discriminator is "
                             f"built from SDXL 1.0-base (context 2048, adm_in_channels 2816).{hint}")
    return config
