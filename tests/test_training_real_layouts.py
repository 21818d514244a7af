"""The trainer's networks on the REAL layouts the paper trains (full SD2.1-base UNet as generator,
full SDXL-base UNet's input + middle blocks as discriminator), built on the meta device: no
weights, no memory. Checks what a tiny test model cannot: every LoRA target exists in the full
layouts, the counts, the discriminator's head width, and the forward shapes at the trainer's crop
sizes (LoRA hooks and gradient checkpointing wrappers included)."""

from __future__ import annotations

import pytest
import torch
from comfy.ldm.modules import attention
from comfy.ldm.modules.attention import BasicTransformerBlock
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from d3sr_core import architectures
from d3sr_core.lora_layers import lora_target_names
from d3sr_core.model import ATTENTION_OVERRIDE_KEY, _fused_attention
from training.discriminator import CONTEXT_SHAPE, Discriminator, encoder_half_on_meta
from training.generator import _checkpointed
from training.lora import LoRASet

META = torch.device("meta")
# meta tensors cannot run ComfyUI's memory-sized sub-quadratic attention; SDPA infers shapes
OPTIONS = {ATTENTION_OVERRIDE_KEY: _fused_attention}


def _meta_unet(config: dict) -> UNetModel:
    import comfy.ops
    with torch.device("meta"):
        return UNetModel(**config, operations=comfy.ops.disable_weight_init)


def _transformer_blocks(module: torch.nn.Module) -> int:
    return sum(isinstance(m, BasicTransformerBlock) for m in module.modules())


def _lora_parameters(modules: dict, names: list[str], rank: int) -> int:
    """rank * (fan_in + out) per layer: A [r, in(, kh, kw)] + B [out, r]."""
    total = 0
    for n in names:
        w = modules[n].weight
        total += rank * (w[0].numel() + w.shape[0])
    return total


def test_generator_lora_on_the_full_sd21_unet():
    unet = _meta_unet(architectures.SD21_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724     # SD2.1-base's UNet
    names = lora_target_names(unet)
    modules = dict(unet.named_modules())
    blocks = _transformer_blocks(unet)
    assert blocks == 16                      # 6 down + 1 middle + 9 up transformers
    attn = [n for n in names if ".attn1." in n or ".attn2." in n]
    assert len(attn) == 8 * blocks          # q, k, v, out of both attentions in every block
    assert "input_blocks.0.0" in names and "out.2" in names
    assert len(names) == 252
    lora = LoRASet(unet, names, rank=16, alpha=16.0, seed=0)
    assert lora.num_parameters() == _lora_parameters(modules, names, 16) == 15_352_448

    # Forward at the smallest and the paper's crop (64 px and 512 px -> 8x8 and 64x64 latents)
    # through the LoRA hooks and the checkpointing wrappers, on meta tensors.
    lora.to(META)
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        for layer in block:
            _checkpointed(layer)
    for side in (8, 64):
        x = torch.empty(2, 4, side, side, device=META)
        out = unet(x, torch.empty(2, device=META), context=torch.empty(2, 77, 1024, device=META),
                   transformer_options=OPTIONS)
        assert out.shape == x.shape


@pytest.mark.parametrize("checkpointing", [False, True])
def test_discriminator_on_the_full_sdxl_unet(checkpointing, monkeypatch):
    config = architectures.SDXL_UNET_CONFIG
    full = _meta_unet(config)
    assert sum(p.numel() for p in full.parameters()) == 2_567_463_684   # SDXL-base's UNet
    unet = encoder_half_on_meta(config)
    assert not hasattr(unet, "output_blocks") and not hasattr(unet, "out")
    blocks = _transformer_blocks(unet)
    assert blocks == 2 + 2 + 10 + 10 + 10     # input levels 1 and 2 (depth 2, 10), middle (10)
    names = lora_target_names(unet)
    assert len([n for n in names if ".attn1." in n or ".attn2." in n]) == 8 * blocks
    assert not [n for n in names if n.startswith(("output_blocks.", "out."))]

    d = Discriminator(unet, torch.zeros(CONTEXT_SHAPE), torch.zeros(1, 1280), rank=16, alpha=16.0,
                      gradient_checkpointing=checkpointing)
    assert d.head[0].in_channels == 1280 and d.head[2].out_channels == 1
    modules = dict(unet.named_modules())
    assert d.lora.num_parameters() == _lora_parameters(modules, names, 16)
    assert sum(p.numel() for p in d.head.parameters()) == 1280 * 1280 + 1280 + 1280 + 1

    d.to(META)
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)  # see OPTIONS
    for crop in (64, 128, 512):             # trainer crops -> latents crop / 8 -> logits / 4 more
        d._adm_cache[(crop, crop)] = torch.empty(1, 2816, device=META)
        x = torch.empty(2, 4, crop // 8, crop // 8, device=META)
        with torch.enable_grad():
            logits = d(x, torch.empty(2, dtype=torch.long, device=META), (crop, crop))
        assert logits.shape == (2, 1, crop // 32, crop // 32)
