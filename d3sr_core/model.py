"""Applying a D3SR weight file to ComfyUI's SD2.1-base model: validation, LoRA patching,
and the `D3SRModel` bundle the upscaler nodes consume."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_patcher
import comfy.sd
import torch

from . import comfy_internals as ci
from .architectures import FAMILY_BY_CONTEXT
from .checks import check_strength
from .schedule import alphas_cumprod
from .weight_format import EMBEDDING_SHAPE, UPSAMPLERS, D3SRWeights, WeightFileError, read_weights


class BaseModelMismatchError(ValueError):
    """The MODEL/VAE given to the loader are not what the weight file was made for."""


@dataclass
class D3SRModel:
    """What flows between the D3SR nodes (type D3SR_MODEL).

    model: a LoRA-patched clone of the user's ModelPatcher (the original stays untouched)
    vae: the user's VAE (SD's 4-channel KL VAE), or a patched clone of it when the weights
        adapt the VAE (OSEDiff's encoder LoRA); the user's VAE stays untouched either way
    text_embedding: [1, 77, 1024] float32, the fixed conditioning
    timestep: T_L, the one timestep the UNet is evaluated at
    upsampler: how the LR image reaches the output size, one of weight_format.UPSAMPLERS
        ("torch-bicubic" unless the weight file says otherwise)
    osediff_steps: run OSEDiff's test-script steps around the network (docs/osediff.md):
        Pillow bicubic, the size brought down to a multiple of 8 with Pillow's Lanczos, and the
        colour fix on 8-bit images. True for OSEDiff weights (metadata source=osediff), whose
        upsampler is then always "pillow-bicubic".
    """

    model: comfy.model_patcher.ModelPatcher
    vae: comfy.sd.VAE
    text_embedding: torch.Tensor
    timestep: int
    name: str = ""
    trained_scale: float = 4.0
    upsampler: str = UPSAMPLERS[0]
    osediff_steps: bool = False


BASE_MODEL_FIX = ("Load Stable Diffusion 2.1-base (v2-1_512-ema-pruned.safetensors) with the stock "
                  "'Load Checkpoint' node and connect its MODEL and VAE.")


def check_base_model(model: comfy.model_patcher.ModelPatcher, vae: comfy.sd.VAE) -> None:
    """Raise BaseModelMismatchError unless `model` is an epsilon SD2.x UNet and `vae` SD's KL VAE."""
    base = model.model
    context = ci.unet_config(base).get("context_dim")
    if context != EMBEDDING_SHAPE[2]:
        family = (f"an {FAMILY_BY_CONTEXT[context]} model" if context in FAMILY_BY_CONTEXT
                  else f"a model with context width {context}")
        raise BaseModelMismatchError(
            f"D3SR needs SD2.1-base (context width 1024) but the connected MODEL is {family} "
            f"({ci.model_config_name(base)}). {BASE_MODEL_FIX}")
    prediction = ci.prediction_type(base)
    if prediction != "EPS":
        raise BaseModelMismatchError(
            f"D3SR needs the epsilon-prediction SD2.1-base, but the connected MODEL predicts "
            f"{prediction} (SD2.1-768 'v' models do not work). {BASE_MODEL_FIX}")
    _check_model_sampling(model)
    channels, dims = ci.vae_latent_format(vae)
    if channels != 4 or dims != 2:
        raise BaseModelMismatchError(
            "D3SR needs SD's 4-channel image VAE, but the connected VAE has "
            f"{channels} latent channels. Connect the VAE output of the same SD2.1-base checkpoint.")


def _check_model_sampling(model: comfy.model_patcher.ModelPatcher) -> None:
    """The MODEL's sampling object (which a ModelSamplingDiscrete node upstream may replace) must
    be epsilon prediction on SD's scaled-linear schedule: the one step assumes both."""
    sampling = model.get_model_object("model_sampling")
    if not ci.sampling_predicts_epsilon(sampling):
        raise BaseModelMismatchError(
            f"D3SR needs epsilon prediction, but the connected MODEL's sampling is {type(sampling).__name__} "
            "(a 'ModelSampling...' node upstream?). Connect the checkpoint loader's MODEL directly.")
    sigmas = ci.sampling_sigmas(sampling)
    expected = ((1 - alphas_cumprod()) / alphas_cumprod()).sqrt().float()
    if sigmas is None or sigmas.shape != expected.shape or not torch.allclose(
            sigmas.detach().float().cpu(), expected, rtol=1e-4, atol=0):
        raise BaseModelMismatchError(
            "D3SR needs SD's scaled-linear noise schedule, but the connected MODEL's sampling uses "
            "another one (zero terminal SNR or a custom schedule from a 'ModelSamplingDiscrete' "
            "node?). Connect the checkpoint loader's MODEL directly.")


def _fitting_layers(layers: dict, state: dict, target_of: Callable[[str], str | None],
                    fits: Callable[[torch.Size, torch.Size], bool], label: str
                    ) -> tuple[dict[str, str], list[tuple[str, str | None]]]:
    """Match LoRA `layers` {name: (A, B, alpha)} to the weights of `state`.

    Returns (name -> weight key for the layers that fit, [(name, why)] for the others in file
    order, why None when no weight of that name exists, else "(file [..], <label> [..])")."""
    to_load, misfits = {}, []
    for name, (a, b, _alpha) in layers.items():
        target = target_of(name)
        expected = torch.Size((b.shape[0], a.shape[1], *a.shape[2:]))
        if target is None or target not in state:
            misfits.append((name, None))
        elif not fits(state[target].shape, expected):
            misfits.append((name, f"(file {list(expected)}, {label} {list(state[target].shape)})"))
        else:
            to_load[name] = target
    return to_load, misfits


def _counted_patches(state_dict: dict, to_load: dict[str, str], what: str) -> dict:
    """ComfyUI's patches for `to_load`; BaseModelMismatchError unless it read every layer."""
    patches = ci.lora_patches(state_dict, to_load)
    if len(patches) != len(to_load):
        raise BaseModelMismatchError(f"ComfyUI accepted {len(patches)} of {len(to_load)} {what} layers; "
                                     "the file may use an unsupported LoRA layout.")
    return patches


def lora_patches(model: comfy.model_patcher.ModelPatcher, weights: D3SRWeights) -> dict:
    """Map the file's LoRA layers onto the model's weights with ComfyUI's own key map.

    Every layer must map to a weight of a matching shape; otherwise BaseModelMismatchError
    counts and names the layers that do not (a partial LoRA is never applied).
    """
    key_map = ci.unet_lora_key_map(model.model)
    to_load, misfits = _fitting_layers(weights.lora, model.model.state_dict(), key_map.get,
                                       lambda have, want: have == want, "model")
    unmapped = [name for name, why in misfits if why is None]
    misshaped = [f"{name} {why}" for name, why in misfits if why is not None]
    if unmapped or misshaped:
        parts = []
        if unmapped:
            parts.append(f"{len(unmapped)} of {len(weights.lora)} LoRA layers name no layer of the "
                         f"connected model (e.g. {', '.join(unmapped[:3])})")
        if misshaped:
            parts.append(f"{len(misshaped)} have the wrong shape (e.g. {'; '.join(misshaped[:2])})")
        raise BaseModelMismatchError("The weight file does not fit the connected model: "
                                     + "; ".join(parts) + f". {BASE_MODEL_FIX}")
    return _counted_patches(weights.lora_state_dict(), to_load, "LoRA")


def full_weight_patches(model: comfy.model_patcher.ModelPatcher, weights: D3SRWeights) -> dict:
    """Full replacement weights (extension full_weights) as "diff" patches against the connected
    model's unpatched weights, so the strength scales them like the LoRA (1.0 = replacement)."""
    state = model.model.state_dict()
    fitting, problems = [], []
    for key, new in weights.full_weights.items():
        if key not in state:
            problems.append(f"{key} (no such weight)")
        elif tuple(state[key].shape) != tuple(new.shape):
            problems.append(f"{key} (file {list(new.shape)}, model {list(state[key].shape)})")
        else:
            fitting.append(key)
    if problems:
        raise BaseModelMismatchError(f"{len(problems)} of {len(weights.full_weights)} full weights do "
                                     f"not fit the connected model (e.g. {'; '.join(problems[:2])}). {BASE_MODEL_FIX}")
    base = ci.unpatched_weights(model, fitting)   # without patches applied right now, if any
    return {key: ("diff", (weights.full_weights[key].float() - base[key].float().cpu(),)) for key in fitting}


def vae_lora_patches(vae: comfy.sd.VAE, weights: D3SRWeights) -> dict:
    """Map the file's VAE LoRA (`vae.<first_stage_model path>`) onto the VAE's weights.
    Every layer must exist with a matching shape, else BaseModelMismatchError."""
    to_load, misfits = _fitting_layers(
        weights.vae_lora, ci.vae_autoencoder(vae).state_dict(),
        lambda name: name[len("vae."):] + ".weight",
        lambda have, want: have.numel() == want.numel() and have[:2] == want[:2], "VAE")
    if misfits:
        problems = [f"{name} {why or '(no such layer)'}" for name, why in misfits]
        raise BaseModelMismatchError(f"{len(problems)} of {len(weights.vae_lora)} VAE LoRA layers do "
                                     f"not fit the connected VAE (e.g. {'; '.join(problems[:2])}). {BASE_MODEL_FIX}")
    return _counted_patches(weights.vae_lora_state_dict(), to_load, "VAE LoRA")


patched_vae_clone = ci.patched_vae_clone    # re-exported: the loader's VAE copy
ATTENTION_OVERRIDE_KEY = ci.ATTENTION_OVERRIDE_KEY
_fused_attention = ci.fused_attention       # the override the D3SR clone's attention goes through


def prefer_fused_cpu_attention(patcher: comfy.model_patcher.ModelPatcher) -> bool:
    """On the CPU, without an attention flag, ComfyUI runs the UNet's attention through its
    sub-quadratic implementation; PyTorch's fused scaled_dot_product_attention (a blocked CPU
    kernel, O(tokens) memory) computes the same result about 3x faster there (SD2.1 at 512 px:
    1.3 s -> 0.45 s per 4096-token self-attention on 2 cores). This routes the attention of the
    D3SR clone `patcher` through it via ComfyUI's per-model `optimized_attention_override`
    (ComfyUI versions without that hook ignore it). The user's MODEL, explicit attention flags,
    GPUs and an override someone else set are left alone. Returns True when it was set."""
    if ci.attention_flag_given() or patcher.load_device.type != "cpu" \
            or not ci.default_attention_is_sub_quadratic():
        return False
    return ci.set_attention_override(patcher, ci.fused_attention)


def load_d3sr(model: comfy.model_patcher.ModelPatcher, vae: comfy.sd.VAE, path: str,
              strength: float = 1.0) -> D3SRModel:
    """Read `path`, check it against `model`/`vae`, and return a D3SRModel with a patched clone."""
    weights = read_weights(path)
    return d3sr_model_from_weights(model, vae, weights, strength, name=os.path.basename(path))


def d3sr_model_from_weights(model: comfy.model_patcher.ModelPatcher, vae: comfy.sd.VAE,
                            weights: D3SRWeights, strength: float = 1.0, name: str = "") -> D3SRModel:
    """As load_d3sr, from weights already in memory (the trainer's export path uses this too)."""
    strength = check_strength(strength)
    check_base_model(model, vae)
    if weights.text_embedding_kind == "none":
        raise WeightFileError(
            f"D3SR weight file '{name}' holds no prompt embedding (converted from OSEDiff without a "
            "text encoder). Load it with the 'Load OSEDiff Model' node and connect the CLIP output "
            "of SD2.1-base, or convert it again with --checkpoint.")
    patches = lora_patches(model, weights)
    full = full_weight_patches(model, weights) if weights.full_weights else {}
    vae_patches = vae_lora_patches(vae, weights) if weights.vae_lora else {}
    patched = model.clone()
    prefer_fused_cpu_attention(patched)
    if full:
        patched.add_patches(full, strength)
    patched.add_patches(patches, strength)
    if vae_patches:
        vae = patched_vae_clone(vae, vae_patches, strength)
    osediff = weights.extra_metadata.get("source") == "osediff"
    return D3SRModel(model=patched, vae=vae, text_embedding=weights.text_embedding.float(),
                     timestep=weights.timestep, name=name, trained_scale=weights.scale,
                     upsampler="pillow-bicubic" if osediff else weights.upsampler,
                     osediff_steps=osediff)
