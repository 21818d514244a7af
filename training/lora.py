"""Trainable LoRA attached to frozen ComfyUI modules with forward hooks.

For a frozen layer W (Linear [out, in] or Conv2d [out, in, kh, kw]) the hook adds
    scale * B(A(x)),  scale = alpha / rank,
where A has the layer's input shape and kernel (Conv2d: same stride/padding/dilation) and B is
a 1x1 map to the output channels. By linearity this equals merging W + scale * B @ A, which is
exactly what ComfyUI's LoRA patcher does with the exported file, so the trained model and the
loaded one compute the same function. A starts random (N(0, 1/fan_in)), B at zero: the first
step runs the unmodified model.

The frozen modules are not owned by `LoRASet` (its parameters are only the A/B tensors), so
`LoRASet.parameters()` is exactly what the optimizer trains and the checkpoint stores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from d3sr_core.lora_layers import lora_shapes


def _key(name: str) -> str:
    return name.replace(".", "__")


class LoRASet(nn.Module):
    """Rank-`rank` LoRA on the named Linear/Conv2d layers of `root` (hooks; root stays frozen).

    lora_A[name]: [r, in] or [r, in, kh, kw]; lora_B[name]: [out, r] or [out, r, 1, 1] (float32).
    """

    def __init__(self, root: nn.Module, names: list[str], rank: int, alpha: float, seed: int) -> None:
        super().__init__()
        if not names:
            raise ValueError("LoRASet: no target layers")
        self.rank, self.alpha, self.scale = int(rank), float(alpha), float(alpha) / float(rank)
        self.names = list(names)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.enabled = True
        modules = dict(root.named_modules())
        gen = torch.Generator().manual_seed(int(seed))
        self._handles = []
        for name in self.names:
            layer = modules[name]
            a_shape, b_shape = lora_shapes(layer, self.rank)
            fan_in = math.prod(a_shape[1:])
            a = torch.randn(a_shape, generator=gen) / math.sqrt(fan_in)
            self.lora_A[_key(name)] = nn.Parameter(a)
            self.lora_B[_key(name)] = nn.Parameter(torch.zeros(b_shape))
            self._handles.append(layer.register_forward_hook(self._hook(name, layer)))

    def _hook(self, name: str, layer: nn.Module):
        key = _key(name)
        is_conv = isinstance(layer, nn.Conv2d)

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if not self.enabled:
                return output
            x = inputs[0]
            a = self.lora_A[key].to(x.dtype)
            b = self.lora_B[key].to(x.dtype)
            if is_conv:
                h = F.conv2d(x, a, None, module.stride, module.padding, module.dilation)
                delta = F.conv2d(h, b)
            else:
                delta = F.linear(F.linear(x, a), b)
            return output + (self.scale * delta).to(output.dtype)
        return hook

    def remove(self) -> None:
        """Detach the hooks from the frozen model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def export(self, prefix: str = "diffusion_model.", state: Mapping[str, torch.Tensor] | None = None
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """{prefix + ldm path: (A, B, alpha)} as detached float32 CPU tensors (D3SRWeights.lora),
        of the live parameters or of `state`, tensors keyed as this module's state_dict() (e.g.
        an EMA copy)."""
        state = self.state_dict() if state is None else state
        return {prefix + name: (state[f"lora_A.{_key(name)}"].detach().float().cpu().clone(),
                                state[f"lora_B.{_key(name)}"].detach().float().cpu().clone(), self.alpha)
                for name in self.names}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a parent's state dict that belong to its child `prefix` ("lora."), keyed as
    the child's own state_dict()."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def freeze(module: nn.Module) -> nn.Module:
    """requires_grad_(False) on every parameter of `module`; returns it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
