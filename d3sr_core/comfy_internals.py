"""The one door to ComfyUI's internals: every use of ComfyUI beyond the calls any custom node
makes is a small function here, its docstring naming what of ComfyUI it relies on, and each has
a test in tests/test_comfy_internals.py that runs against the pinned host. A new ComfyUI
release that moves one of them fails that file with a clear message, not the pack at run time.

Not here (the ordinary calls of custom nodes and ComfyUI's own nodes): comfy_api, the checkpoint
loader (`comfy.sd.load_checkpoint_guess_config`), `ModelPatcher.clone / add_patches /
get_model_object / get_key_patches / model_options / load_device / patches`, `BaseModel.
apply_model / process_latent_in / process_latent_out / memory_required / diffusion_model`,
`VAE.encode / decode / device / vae_dtype`, `CLIP.tokenize / encode_from_tokens`,
`comfy.model_management`'s device and interrupt helpers and `comfy.utils` (ProgressBar,
load_torch_file, set_progress_bar_enabled).

ComfyUI modules are imported inside each function: `set_device_options` must run before
`comfy.model_management` is first imported, so importing this module imports nothing of ComfyUI.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

# --- start-up -----------------------------------------------------------------------------------


def set_device_options(cpu: bool) -> bool:
    """Set ComfyUI's command-line options for an in-process host: `args.cpu` and
    `args.disable_api_nodes` of `comfy.cli_args.args`. ComfyUI reads them once, when
    `comfy.model_management` is first imported (a CPU-only torch fails there without `cpu`), so
    this only acts before that import; returns False (nothing changed) after it."""
    if "comfy.model_management" in sys.modules:
        return False
    from comfy.cli_args import args
    args.cpu = bool(cpu)
    args.disable_api_nodes = True
    return True


def register_model_folder(name: str, default: str) -> None:
    """Make `name` a model folder of ComfyUI (`folder_paths.folder_names_and_paths[name] =
    (paths, extensions)`) with `default` first, paths already registered for it (from
    extra_model_paths.yaml) kept, and ComfyUI's model extensions
    (`folder_paths.supported_pt_extensions`). The public `add_model_folder_path` would give a new
    name an empty extension set, which lists every file."""
    import folder_paths
    paths, _ = folder_paths.folder_names_and_paths.get(name, ([], set()))
    if default not in paths:
        paths = [default, *paths]
    folder_paths.folder_names_and_paths[name] = (paths, set(folder_paths.supported_pt_extensions))


# --- what a loaded model is ---------------------------------------------------------------------


def unet_config(base_model: nn.Module) -> dict:
    """The UNet config ComfyUI detected for a loaded model (`BaseModel.model_config.unet_config`:
    context_dim, channel_mult, model_channels, ...); {} for a model without one."""
    config = getattr(base_model, "model_config", None)
    return getattr(config, "unet_config", None) or {}


def model_config_name(base_model: nn.Module) -> str:
    """The name of ComfyUI's supported-model class for a loaded model (`type(BaseModel.
    model_config).__name__`: 'SD20', 'SD15', 'SDXL', ...), for messages."""
    return type(getattr(base_model, "model_config", None)).__name__


def prediction_type(base_model: nn.Module) -> str:
    """What a loaded model predicts, as the name of `comfy.model_base.ModelType`
    (`BaseModel.model_type`): 'EPS' (epsilon), 'V_PREDICTION', ..."""
    return base_model.model_type.name


def sampling_predicts_epsilon(sampling: object) -> bool:
    """True when a model's sampling object (`get_model_object("model_sampling")`, which a
    ModelSampling node may replace) computes x0 as epsilon prediction does. ComfyUI composes the
    sampling class from a schedule class and a prediction mixin (`comfy.model_sampling.EPS`,
    `V_PREDICTION`, `LCM`, ...) whose `calculate_denoised` is the x0 formula."""
    import comfy.model_sampling
    return type(sampling).calculate_denoised is comfy.model_sampling.EPS.calculate_denoised


def sampling_sigmas(sampling: object) -> torch.Tensor | None:
    """The discrete schedule's sigmas [1000] of a model's sampling object (buffer `sigmas` of
    `comfy.model_sampling.ModelSamplingDiscrete`), or None for a continuous schedule."""
    return getattr(sampling, "sigmas", None)


def vae_latent_format(vae: object) -> tuple[object, object]:
    """(latent channels, latent dimensions) of a ComfyUI VAE (`VAE.latent_channels`,
    `VAE.latent_dim`): (4, 2) for SD's KL VAE; '?' / 2 where an attribute is missing."""
    return getattr(vae, "latent_channels", "?"), getattr(vae, "latent_dim", 2)


def vae_autoencoder(vae: object) -> nn.Module:
    """The torch module inside a ComfyUI VAE (`VAE.first_stage_model`, for SD an
    `AutoencoderKL` taking [-1, 1] images and giving the unscaled posterior mode). It is also the
    module its patcher patches (`VAE.patcher.model`), so its state-dict names are patch keys."""
    return vae.first_stage_model


def vae_decode_memory(vae: object, latent_shape: list[int]) -> float:
    """ComfyUI's estimate of the bytes a VAE decode of `latent_shape` [B, C, h, w] needs in the
    VAE's dtype (`VAE.memory_used_decode`, the figure its own decode plans with)."""
    return vae.memory_used_decode(latent_shape, vae.vae_dtype)


# --- weights and patches ------------------------------------------------------------------------


def unpatched_weights(patcher: object, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The model's own weights for `keys`, without the patches that may be applied to it right
    now: the first entry of `ModelPatcher.get_key_patches()` is the weight before patching
    (ComfyUI's backup while patched, else the live weight)."""
    entries = patcher.get_key_patches()
    return {key: entries[key][0][0] for key in keys}


def unet_lora_key_map(base_model: nn.Module) -> dict[str, str]:
    """ComfyUI's LoRA name -> weight key map for a loaded UNet (`comfy.lora.model_lora_keys_unet`,
    what its LoraLoader uses): `diffusion_model.<ldm path>` and kohya `lora_unet_...` names map to
    `diffusion_model.<ldm path>.weight`."""
    import comfy.lora
    return comfy.lora.model_lora_keys_unet(base_model, {})


def lora_patches(state_dict: Mapping[str, torch.Tensor], to_load: Mapping[str, str]) -> dict:
    """ComfyUI's patches for LoRA tensors `<name>.lora_A.weight / .lora_B.weight / .alpha`, one
    per entry of `to_load` (name -> weight key), in the form `ModelPatcher.add_patches` takes
    (`comfy.lora.load_lora`; the scale is alpha / rank). Names it cannot read are left out, not
    logged: callers count the result."""
    import comfy.lora
    return comfy.lora.load_lora(dict(state_dict), dict(to_load), log_missing=False)


def patched_vae_clone(vae: object, patches: dict, strength: float = 1.0) -> object:
    """A VAE sharing `vae`'s modules with its own patcher clone carrying `patches` (keys of
    `vae_autoencoder(vae)`): ComfyUI swaps patches in when a patcher is loaded and out when
    another one is, so `vae` keeps computing with its own weights. Relies on `VAE.patcher` being
    the ModelPatcher that `VAE.encode/decode` load (ComfyUI's VAE has no clone() in 0.3.75; a
    shallow copy with a new patcher is one)."""
    clone = vae.clone() if hasattr(vae, "clone") else copy.copy(vae)
    if clone.patcher is vae.patcher:
        clone.patcher = vae.patcher.clone()
    clone.patcher.add_patches(patches, strength)
    return clone


# --- attention ----------------------------------------------------------------------------------

ATTENTION_OVERRIDE_KEY = "optimized_attention_override"
ATTENTION_FLAGS = ("use_split_cross_attention", "use_quad_cross_attention", "use_sage_attention",
                   "use_flash_attention")


def attention_flag_given() -> bool:
    """True when ComfyUI was started with an explicit attention choice (`comfy.cli_args.args`:
    --use-split-cross-attention, --use-quad-cross-attention, --use-sage-attention,
    --use-flash-attention)."""
    from comfy.cli_args import args
    return any(getattr(args, flag, False) for flag in ATTENTION_FLAGS)


def default_attention_is_sub_quadratic() -> bool:
    """True when ComfyUI's UNet attention is its sub-quadratic implementation
    (`comfy.ldm.modules.attention.optimized_attention is attention_sub_quad`, its CPU default)."""
    from comfy.ldm.modules import attention
    return attention.optimized_attention is attention.attention_sub_quad


def fused_attention(func: Callable, *args, **kwargs) -> torch.Tensor:
    """An attention override: PyTorch's scaled_dot_product_attention through ComfyUI's
    `attention_pytorch` in place of `func`, same arguments (q, k, v, heads, mask=None, ...);
    softmax(Q K^T / sqrt(d)) V either way."""
    from comfy.ldm.modules import attention
    return attention.attention_pytorch(*args, **kwargs)


def set_attention_override(patcher: object, override: Callable) -> bool:
    """Route one model's attention through `override(func, *args, **kwargs)`: ComfyUI's attention
    functions call `transformer_options["optimized_attention_override"]` of the model's options
    when it is set (versions without that hook ignore it). An override already there is kept;
    returns True when `override` was set."""
    options = patcher.model_options.setdefault("transformer_options", {})
    if ATTENTION_OVERRIDE_KEY in options:
        return False
    options[ATTENTION_OVERRIDE_KEY] = override
    return True


# --- building ComfyUI's networks ----------------------------------------------------------------


def build_unet(config: dict, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> nn.Module:
    """ComfyUI's `UNetModel(**config)` with its no-init layers (`comfy.ops.disable_weight_init`:
    weights uninitialised, to be loaded), on `device` ("meta": shapes only, no memory)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    extra = {} if dtype is None else {"dtype": dtype}
    with _on(device):
        return UNetModel(**config, **extra, operations=comfy.ops.disable_weight_init)


def build_kl_vae(ddconfig: dict, device: torch.device | str | None = None) -> nn.Module:
    """ComfyUI's `AutoencoderKL(ddconfig=ddconfig, embed_dim=4)` (SD's KL VAE for
    architectures.KL_VAE_DDCONFIG), on `device` ("meta": shapes only)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    with _on(device):
        return AutoencoderKL(ddconfig=ddconfig, embed_dim=4)


def _on(device: torch.device | str | None) -> contextlib.AbstractContextManager:
    """torch's default-device context for `device`; no change for None."""
    return torch.device(device) if device is not None else contextlib.nullcontext()


def drop_unet_decoder(unet: nn.Module) -> nn.Module:
    """Remove the decoder half of ComfyUI's UNetModel in place (its `output_blocks`, `out` and
    `id_predictor` attributes), keeping `time_embed`, `label_emb`, `input_blocks` and
    `middle_block`: what `encoder_features` runs."""
    del unet.output_blocks
    del unet.out
    if hasattr(unet, "id_predictor"):
        del unet.id_predictor
    return unet


def encoder_channels(unet: nn.Module) -> int | None:
    """Channels of the UNet's middle-block output: its last layer's `out_channels` (a ResBlock),
    else `model_channels * channel_mult[-1]`; None when neither attribute exists."""
    last = unet.middle_block[-1]
    if hasattr(last, "out_channels"):
        return last.out_channels
    if hasattr(unet, "channel_mult"):
        return unet.model_channels * unet.channel_mult[-1]
    return None


def unet_embedding(unet: nn.Module, timesteps: torch.Tensor, y: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """The embedding ComfyUI's UNetModel gives its blocks: `time_embed(timestep_embedding(t,
    model_channels))` plus `label_emb(y)` for class/size-conditioned models (SDXL: y [B, 2816]),
    as `UNetModel._forward` computes it before the input blocks. t [B] in 0..999 -> [B, E]."""
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
    t_emb = timestep_embedding(timesteps.float(), unet.model_channels, repeat_only=False).to(dtype)
    emb = unet.time_embed(t_emb)
    return emb if y is None else emb + unet.label_emb(y)


def run_block(block: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """One of the UNet's `input_blocks` / `middle_block` (a TimestepEmbedSequential) on h, called
    as ComfyUI's `forward_timestep_embed(block, h, emb, context, transformer_options={})` is."""
    return block(h, emb, context, {})


def sinusoidal_embedding(value: float, dim: int) -> torch.Tensor:
    """ComfyUI's sinusoidal embedding [1, dim] of one number (`timestep_embedding`, as SDXL's size
    conditioning uses it through `openaimodel.Timestep(dim)`)."""
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
    return timestep_embedding(torch.tensor([float(value)]), dim)


def is_linear_or_conv(module: nn.Module) -> bool:
    """True for the UNet's Linear and Conv2d layers, the ones LoRA adapts. ComfyUI's layer classes
    (`comfy.ops.disable_weight_init.Linear / Conv2d`, `manual_cast`, ...) subclass torch's
    `nn.Linear / nn.Conv2d` and are called as modules with the input first, so forward hooks see
    (x, output) and the weight has torch's layout."""
    return isinstance(module, (nn.Linear, nn.Conv2d))


def unet_block_layers(unet: nn.Module) -> list[nn.Module]:
    """The layers inside the UNet's input, middle and output blocks, each of which ComfyUI's
    UNetModel calls as a module of its own (`forward_timestep_embed` loops over a block's
    children; the block's own forward is never called): wrapping a layer's `forward` changes
    what the UNet computes, wrapping a block's does not."""
    return [layer for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
            for layer in block]


# --- names and layouts --------------------------------------------------------------------------


def unet_diffusers_to_ldm(config: dict) -> dict[str, str]:
    """diffusers UNet parameter name -> ComfyUI (ldm) name for a UNet config
    (`comfy.utils.unet_to_diffusers`, which despite its name maps diffusers -> ldm)."""
    import comfy.utils
    return comfy.utils.unet_to_diffusers(config)


def vae_diffusers_to_ldm(names: Iterable[str]) -> dict[str, str]:
    """diffusers VAE parameter names -> ComfyUI (ldm) names, through ComfyUI's VAE state-dict
    conversion (`comfy.diffusers_convert.convert_vae_state_dict`), run on one name at a time with
    an empty tensor: it renames keys by substring and reshapes only the values."""
    import comfy.diffusers_convert
    convert = comfy.diffusers_convert.convert_vae_state_dict
    return {n: next(iter(convert({n: torch.empty(0)}))) for n in names}


def supported_model_name(unet_config: dict) -> str | None:
    """The name of the supported-model class ComfyUI picks for a detected UNet config
    (`comfy.model_detection.model_config_from_unet_config`: 'SD20', 'SDXL', ...), None if none."""
    import comfy.model_detection
    config = comfy.model_detection.model_config_from_unet_config(unet_config)
    return type(config).__name__ if config is not None else None


def detect_unet_config(state: Mapping[str, torch.Tensor], prefix: str) -> dict | None:
    """ComfyUI's UNet config for a checkpoint's tensors (`comfy.model_detection.
    detect_unet_config`: reads only names and shapes, so meta tensors do); None if none found."""
    import comfy.model_detection
    return comfy.model_detection.detect_unet_config(state, prefix)


# --- text encoders ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipTokenizer:
    """The pieces of ComfyUI's SD CLIP tokenizer used to tokenise text literally.

    name: the key of ComfyUI's token dict ('h' for SD2); hf: the Hugging Face tokenizer;
    tokens_start: leading ids hf adds (the start token); adds_end: hf appends the end token;
    start / end / pad: ComfyUI's token ids for this model."""

    name: str
    hf: Callable
    tokens_start: int
    adds_end: bool
    start: int
    end: int
    pad: int


def clip_tokenizer(clip: object) -> ClipTokenizer | None:
    """The SD tokenizer inside a ComfyUI CLIP (`CLIP.tokenizer`, an `SD1Tokenizer` holding its
    `SDTokenizer` under the attribute named by `.clip`, which holds the Hugging Face tokenizer
    and the start/end/pad ids); None when the CLIP's tokenizer is not of that kind."""
    outer = getattr(clip, "tokenizer", None)
    name = getattr(outer, "clip_name", None)
    inner = getattr(outer, getattr(outer, "clip", ""), None)
    hf = getattr(inner, "tokenizer", None)
    if name is None or hf is None or getattr(inner, "start_token", None) is None:
        return None
    return ClipTokenizer(name=name, hf=hf, tokens_start=inner.tokens_start,
                         adds_end=bool(inner.tokenizer_adds_end_token), start=inner.start_token,
                         end=inner.end_token, pad=inner.pad_token)


def sdxl_text_encoders(unet_config: dict, tensors: Mapping[str, torch.Tensor]) -> tuple[object, list[str]] | None:
    """ComfyUI's SDXL CLIP (CLIP-L + OpenCLIP bigG) from a checkpoint's `conditioner.embedders.*`
    tensors, built as its checkpoint loader builds it (`comfy.supported_models.SDXL(unet_config)`:
    `process_clip_state_dict`, `clip_target`, then `comfy.sd.CLIP` and `CLIP.load_sd`), for any
    SDXL-shaped UNet config. Returns (clip, missing tensor names), or None without such tensors."""
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    model_config = comfy.supported_models.SDXL(unet_config)
    clip_sd = model_config.process_clip_state_dict(dict(tensors))
    if not clip_sd:
        return None
    clip = comfy.sd.CLIP(model_config.clip_target(state_dict=clip_sd), tokenizer_data=clip_sd,
                         parameters=comfy.utils.calculate_parameters(clip_sd))
    missing, _unexpected = clip.load_sd(clip_sd, full_model=True)
    return clip, list(missing)
