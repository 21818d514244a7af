"""The trainable D3SR generator: SD2.1-base (loaded with ComfyUI) + LoRA + the fixed embedding
(an nn.Parameter; frozen by default as in the paper, trained with generator.train_embedding).

The UNet step is `d3sr_core.pipeline.predict_x0`, the same function the nodes run, so what
trains is what `D3SRUpscale` computes after export:
    z_L = 0.18215 * E(2 x_L - 1)          (posterior mode; frozen encoder, no gradient)
    z_H = predict_x0(unet + LoRA, z_L, T_L, embedding)
    x_H = (D(z_H / 0.18215) + 1) / 2      (frozen decoder; gradients flow through it)
The encoder and decoder steps are `pipeline.autoencoder_encode / autoencoder_decode`: the nodes'
VAE maths on the bare autoencoder, which the trainer places itself.
Images are BCHW in [0, 1]; latents [B, 4, H/8, W/8].
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from d3sr_core import comfy_internals, pipeline
from d3sr_core.lora_layers import lora_target_names
from d3sr_core.weight_format import EMBEDDING_SHAPE, D3SRWeights

from .lora import LoRASet, freeze, sub_state
from .model_files import ModelFileError, check_model_file

log = logging.getLogger("d3sr.train")


def load_generator_models(path: str, dtype: torch.dtype = torch.float32):
    """(ModelPatcher, CLIP or None, VAE) of an SD2.1-base checkpoint via ComfyUI's loader.
    Raises ModelFileError for a missing file or another model family."""
    check_model_file(path, "generator")
    import comfy.sd

    from d3sr_core.model import BASE_MODEL_FIX, BaseModelMismatchError, check_base_model
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, model_options={"dtype": dtype})
    try:  # the inference loader's check: epsilon SD2.x (SD2.1-768 is v-prediction), SD's VAE
        check_base_model(model, vae)
    except BaseModelMismatchError as e:
        message = str(e).replace(BASE_MODEL_FIX, "Set models.generator to SD2.1-base "
                                 "(v2-1_512-ema-pruned.safetensors).")
        raise ModelFileError(f"generator checkpoint '{path}': {message}") from None
    return model, clip, vae


def empty_prompt_embedding(clip, cache_file: str | None = None) -> torch.Tensor:
    """The fixed embedding [1, 77, 1024] (its start, when generator.train_embedding trains it):
    `cache_file` (safetensors with tensor 'text_embedding') if given, else SD2.1's text encoder
    on "", else zeros with a warning (checkpoints without a text encoder, e.g. the generated
    test models)."""
    if cache_file:
        emb = load_file(cache_file)["text_embedding"].float()
        if tuple(emb.shape) != EMBEDDING_SHAPE:
            raise ModelFileError(f"embedding file '{cache_file}' holds shape {list(emb.shape)}, "
                                 f"expected {list(EMBEDDING_SHAPE)}")
        return emb
    if clip is None:
        log.warning("the generator checkpoint has no text encoder: the fixed embedding is zeros "
                    "(set models.embedding_file to use SD2.1's empty prompt)")
        return torch.zeros(EMBEDDING_SHAPE)
    tokens = clip.tokenize("")
    cond = clip.encode_from_tokens(tokens).float().cpu()
    if tuple(cond.shape) != EMBEDDING_SHAPE:
        raise ModelFileError(f"the generator's text encoder gives {list(cond.shape)}, expected "
                             f"{list(EMBEDDING_SHAPE)}: is this SD2.1-base?")
    return cond


def _checkpointed(module: nn.Module) -> None:
    """Recompute `module`'s activations in backward (non-reentrant checkpointing). Wraps the
    module's own forward, so it must be a module its parent calls, such as the layers of
    comfy_internals.unet_block_layers."""
    forward = module.forward

    def wrapped(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    module.forward = wrapped


class Generator(nn.Module):
    """Parameters: LoRA A/B on the SD2.1 UNet's target layers and `embedding` [1, 77, 1024].
    The frozen ComfyUI BaseModel and VAE are held outside the module tree."""

    def __init__(self, patcher, vae, embedding: torch.Tensor, timestep: int, rank: int = 16,
                 alpha: float = 16.0, seed: int = 0, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if not 1 <= int(timestep) <= 999:
            raise ValueError(f"T_L must be in 1..999, got {timestep}")
        self._frozen = {"base": freeze(patcher.model), "vae": freeze(comfy_internals.vae_autoencoder(vae)),
                        "patcher": patcher, "vae_wrapper": vae}
        unet = patcher.model.diffusion_model
        self.lora = LoRASet(unet, lora_target_names(unet), rank, alpha, seed)
        self.embedding = nn.Parameter(embedding.detach().float().clone().reshape(EMBEDDING_SHAPE))
        self.timestep = int(timestep)
        self.multiple = pipeline.VAE_MULTIPLE
        if gradient_checkpointing:
            for layer in comfy_internals.unet_block_layers(unet):
                _checkpointed(layer)

    @property
    def base(self):
        """ComfyUI's BaseModel (frozen)."""
        return self._frozen["base"]

    @property
    def autoencoder(self) -> nn.Module:
        """ComfyUI's AutoencoderKL (frozen)."""
        return self._frozen["vae"]

    def move_frozen(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        """Put the frozen UNet and VAE on `device` (the trainer manages placement, not ComfyUI)."""
        self.base.to(device=device)
        if dtype is not None:
            self.base.diffusion_model.to(dtype=dtype)
        self.autoencoder.to(device=device, dtype=dtype or torch.float32)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """BCHW [0, 1], sizes a multiple of 8 -> scaled latent [B, 4, H/8, W/8] (posterior mode)."""
        return pipeline.autoencoder_encode(self.autoencoder, self.base, pixels)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> BCHW image, (D(z / 0.18215) + 1) / 2, NOT clamped (gradients flow)."""
        return pipeline.autoencoder_decode(self.autoencoder, self.base, z)

    def forward(self, z_l: torch.Tensor) -> torch.Tensor:
        """z_L [B, 4, h, w] -> z_H [B, 4, h, w] through pipeline.predict_x0 (the nodes' step)."""
        return pipeline.predict_x0(self.base, z_l, self.timestep, self.embedding)

    @torch.no_grad()
    def super_resolve(self, lr: torch.Tensor, factor: float) -> torch.Tensor:
        """LR BCHW [0, 1] -> SR BCHW [0, 1] as the node computes it without colour fix
        (bicubic upsample, pad to a multiple of 8, encode, one step, decode, crop, clamp)."""
        out_h, out_w = pipeline.output_size(lr.shape[-2], lr.shape[-1], factor)
        up = pipeline.bicubic_upsample(lr.float(), (out_h, out_w))
        padded = pipeline.pad_to_multiple(up, self.multiple)
        sr = self.decode(self(self.encode(padded)))
        return sr[..., :out_h, :out_w].clamp(0.0, 1.0)

    def export_weights(self, scale: float, training: dict | None = None,
                       state: Mapping[str, torch.Tensor] | None = None) -> D3SRWeights:
        """The D3SR weight file contents (d3sr_core.weight_format) for the current parameters,
        or for `state`, tensors keyed as this module's state_dict() (e.g. an EMA copy)."""
        if state is None:
            lora, emb = self.lora.export(), self.embedding
        else:
            lora, emb = self.lora.export(state=sub_state(state, "lora.")), state["embedding"]
        return D3SRWeights(lora=lora, text_embedding=emb.detach().float().cpu().clone(),
                           timestep=self.timestep, scale=float(scale), lora_rank=self.lora.rank,
                           lora_alpha=self.lora.alpha, training=training)
