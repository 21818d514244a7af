"""The D3SR clone's UNet attention on the CPU: PyTorch's fused SDPA instead of ComfyUI's default
sub-quadratic attention (3x faster there), same output, the user's MODEL untouched."""

from __future__ import annotations

import pytest
import torch
from comfy.cli_args import args
from comfy.ldm.modules import attention

from d3sr_core import upscale as plain
from d3sr_core.model import ATTENTION_OVERRIDE_KEY, load_d3sr, prefer_fused_cpu_attention

pytestmark = pytest.mark.skipif(attention.optimized_attention is not attention.attention_sub_quad,
                                reason="this ComfyUI does not default to sub-quadratic attention")


@pytest.fixture
def d3sr(tiny_sd2, models_dir):
    model, vae = tiny_sd2
    return load_d3sr(model, vae, str(models_dir / "d3sr" / "tiny-t399.safetensors"))


def test_clone_uses_fused_attention_with_the_same_output(d3sr, tiny_sd2, monkeypatch):
    model, _vae = tiny_sd2
    assert ATTENTION_OVERRIDE_KEY in d3sr.model.model_options["transformer_options"]
    assert ATTENTION_OVERRIDE_KEY not in model.model_options.get("transformer_options", {})

    calls = []
    fused = attention.attention_pytorch

    def counting(*a, **kw):
        calls.append(a[0].shape)
        return fused(*a, **kw)
    monkeypatch.setattr(attention, "attention_pytorch", counting)
    lr = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(3))
    out = plain.upscale(d3sr, lr, 4.0, "none")
    assert calls, "the UNet's attention did not go through scaled_dot_product_attention"

    del d3sr.model.model_options["transformer_options"][ATTENTION_OVERRIDE_KEY]
    n = len(calls)
    ref = plain.upscale(d3sr, lr, 4.0, "none")        # ComfyUI's own (sub-quadratic) attention
    assert len(calls) == n
    err = (out - ref).abs().max().item()
    assert err < 1e-5, f"fused and sub-quadratic attention differ by {err}"


def test_explicit_choices_are_kept(tiny_sd2, monkeypatch):
    model, _vae = tiny_sd2
    own = object()
    clone = model.clone()
    clone.model_options.setdefault("transformer_options", {})[ATTENTION_OVERRIDE_KEY] = own
    assert not prefer_fused_cpu_attention(clone)
    assert clone.model_options["transformer_options"][ATTENTION_OVERRIDE_KEY] is own

    monkeypatch.setattr(args, "use_quad_cross_attention", True)  # the user asked for sub-quadratic
    clone = model.clone()
    assert not prefer_fused_cpu_attention(clone)
    assert ATTENTION_OVERRIDE_KEY not in clone.model_options.get("transformer_options", {})
    monkeypatch.setattr(args, "use_quad_cross_attention", False)

    clone = model.clone()
    clone.load_device = torch.device("meta")                      # not a CPU
    assert not prefer_fused_cpu_attention(clone)
    clone = model.clone()
    assert prefer_fused_cpu_attention(clone)
