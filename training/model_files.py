"""Checking the user's model files before training: which family a checkpoint's UNet is.

ComfyUI's own detection (`comfy_internals.detect_unet_config`) reads the UNet's shape
from the checkpoint's tensor names and shapes; here it runs on a shapes-only view (safetensors
headers, no weights read) so that a wrong file is reported in milliseconds, before anything
large is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from d3sr_core import comfy_internals
from d3sr_core.architectures import FAMILY_BY_CONTEXT, SDXL_ADM_CHANNELS

UNET_PREFIX = "model.diffusion_model."


class ModelFileError(ValueError):
    """A model file given to the trainer is missing, unreadable or of the wrong family."""


def _shapes_only(path: str) -> dict[str, torch.Tensor]:
    """{name: meta tensor with the stored shape/dtype} without reading any weights."""
    if path.lower().endswith(".safetensors"):
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
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise ModelFileError(f"{role} checkpoint '{path}' holds no UNet (no '{UNET_PREFIX}*' tensors); "
                             "give a full Stable Diffusion checkpoint (UNet + VAE), not a LoRA or a VAE.")
    try:
        config = comfy_internals.detect_unet_config(state, UNET_PREFIX)
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
    if ctx == 2048 and config.get("adm_in_channels") == SDXL_ADM_CHANNELS:
        return "SDXL"
    return FAMILY_BY_CONTEXT.get(ctx, f"an unknown model (context width {ctx})")


@dataclass(frozen=True)
class _Role:
    """What one of the trainer's two model files must be."""

    label: str          # how errors name the file
    family: str         # the family it must be
    needs: str          # what D3SR builds from it, for the error
    other_role: str     # the config key the other family belongs in
    other_family: str
    needs_vae: bool


ROLES = {
    "generator": _Role("generator (SD2.1-base)", "SD2.x",
                       "Stable Diffusion 2.1-base (context width 1024)", "models.discriminator", "SDXL", True),
    "discriminator": _Role("discriminator (SDXL-base)", "SDXL",
                           "built from SDXL 1.0-base (context 2048, adm_in_channels 2816)", "models.generator",
                           "SD2.x", False),
}


def check_model_file(path: str, role: str) -> dict:
    """Raise ModelFileError unless `path` fits `role`: 'generator' (an SD2.x checkpoint with a
    VAE, i.e. SD2.1-base) or 'discriminator' (an SDXL-shaped UNet: context 2048, adm 2816).
    Returns the detected UNet config."""
    r = ROLES[role]
    config = read_unet_config(path, r.label)
    fam = family(config)
    if fam != r.family:
        hint = (f" It looks like the {'SD2.1' if fam == 'SD2.x' else fam} file: that one belongs in "
                f"{r.other_role}." if fam == r.other_family else "")
        raise ModelFileError(f"{role} checkpoint '{path}' is {fam}, but D3SR's {role} is {r.needs}.{hint}")
    if r.needs_vae and not config["_has_vae"]:
        raise ModelFileError(f"{role} checkpoint '{path}' has no VAE (first_stage_model.*); use the "
                             "full SD2.1-base checkpoint (v2-1_512-ema-pruned.safetensors).")
    return config
