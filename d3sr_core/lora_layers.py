"""Which UNet layers D3SR adapts with LoRA (our default; the paper names no list).

Attention q/k/v/out, transformer proj_in/proj_out, feed-forward linears, resnet
conv1/conv2/skip convolutions, conv_in and conv_out, named by their ldm paths in ComfyUI's
`UNetModel` (e.g. `input_blocks.1.1.transformer_blocks.0.attn1.to_q`). On SD2.1-base that is
252 layers and, at rank 16, 15.35 M LoRA parameters (the paper's 966.3 M total suggests about
16.8 M; it publishes no list).
"""

from __future__ import annotations

import torch

from . import comfy_internals

_ATTENTION = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2")
                   for proj in ("to_q", "to_k", "to_v", "to_out.0"))
TARGET_SUFFIXES = _ATTENTION + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                                "in_layers.2", "out_layers.3", "skip_connection")
TARGET_NAMES = ("input_blocks.0.0", "out.2")  # conv_in, conv_out


def lora_target_names(unet: torch.nn.Module) -> list[str]:
    """ldm paths of the Linear/Conv2d layers of `unet` (a ComfyUI UNetModel) that take LoRA."""
    names = []
    for name, module in unet.named_modules():
        if not comfy_internals.is_linear_or_conv(module):
            continue
        if name in TARGET_NAMES or name.endswith(TARGET_SUFFIXES):
            names.append(name)
    return names


def lora_shapes(layer: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (A, B) for a rank-`rank` LoRA on a Linear or Conv2d `layer`.

    Linear [out, in]: A [r, in], B [out, r]. Conv2d [out, in, kh, kw]: A [r, in, kh, kw]
    (same stride/padding as the layer), B [out, r, 1, 1].
    """
    w = layer.weight
    if w.ndim == 2:
        return (rank, w.shape[1]), (w.shape[0], rank)
    return (rank, w.shape[1], *w.shape[2:]), (w.shape[0], rank, 1, 1)
