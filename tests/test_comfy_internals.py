"""What the pack relies on in ComfyUI's internals (d3sr_core.comfy_internals), one test per use,
against the real pinned host. A ComfyUI release that changes one of them fails here, naming it."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import comfy.model_base
import comfy.model_management as mm
import comfy.supported_models
import folder_paths
import pytest
import torch
from comfy.cli_args import args
from comfy.ldm.modules import attention

from d3sr_core import comfy_internals as ci
from d3sr_core import host, pipeline
from d3sr_core.architectures import KL_VAE_DDCONFIG, SD21_UNET_CONFIG, SDXL_UNET_CONFIG
from d3sr_core.lora_layers import lora_target_names
from d3sr_core.osediff import literal_tokens
from d3sr_core.schedule import alphas_cumprod
from d3sr_core.weight_format import EMBEDDING_SHAPE, D3SRWeights
from devtools import synthetic
from training.discriminator import size_conditioning

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "model.diffusion_model."


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    """|a - b| <= rel * max|b| (float32 arithmetic on both sides)."""
    scale = float(b.abs().max()) or 1.0
    err = float((a.double() - b.double()).abs().max())
    assert err <= rel * scale, f"differ by {err:.3g} (scale {scale:.3g})"


# --- start-up -----------------------------------------------------------------------------------

def test_device_options_are_read_when_model_management_is_first_imported():
    assert not ci.set_device_options(True), "comfy.model_management is imported here already"
    script = ("import sys; sys.path.insert(0, sys.argv[1]); sys.path.append(sys.argv[2])\n"
              "from d3sr_core import comfy_internals as ci\n"
              "assert not [m for m in sys.modules if m.split('.')[0] == 'comfy'], 'imports ComfyUI'\n"
              "assert ci.set_device_options(cpu=True)\n"
              "import comfy.model_management as mm\n"
              "from comfy.cli_args import args\n"
              "assert mm.get_torch_device().type == 'cpu' and mm.cpu_state == mm.CPUState.CPU\n"
              "assert args.disable_api_nodes is True\n"
              "assert not ci.set_device_options(cpu=False)\n")
    proc = subprocess.run([sys.executable, "-c", script, host.find_comfyui(), str(ROOT)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=""))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_model_folder_lists_model_files_and_keeps_registered_paths(tmp_path):
    name, default, extra = "d3sr_internals_test", tmp_path / "default", tmp_path / "extra"
    for folder in (default, extra):
        folder.mkdir()
    (default / "a.safetensors").write_bytes(b"")
    (default / "notes.txt").write_text("not a model")
    (extra / "b.pt").write_bytes(b"")
    try:
        folder_paths.add_model_folder_path(name, str(extra))   # as extra_model_paths.yaml would
        ci.register_model_folder(name, str(default))
        ci.register_model_folder(name, str(default))           # twice: still one entry
        assert folder_paths.get_folder_paths(name) == [str(default), str(extra)]
        assert sorted(folder_paths.get_filename_list(name)) == ["a.safetensors", "b.pt"]
    finally:
        folder_paths.folder_names_and_paths.pop(name, None)
        folder_paths.filename_list_cache.pop(name, None)


# --- what a loaded model is ---------------------------------------------------------------------

def test_unet_config_and_family_of_a_loaded_model(tiny_sd2):
    model, _vae = tiny_sd2
    config = ci.unet_config(model.model)
    for key in ("context_dim", "model_channels", "channel_mult", "use_linear_in_transformer"):
        assert config[key] == synthetic.TINY_SD2_UNET_CONFIG[key], key
    assert ci.model_config_name(model.model) == "SD20"
    assert ci.unet_config(torch.nn.Linear(1, 1)) == {}


def test_prediction_type_names_eps_and_v(tiny_sd2):
    model, _vae = tiny_sd2
    assert ci.prediction_type(model.model) == "EPS"
    v_model = comfy.model_base.BaseModel(model.model.model_config, comfy.model_base.ModelType.V_PREDICTION,
                                         device="meta")
    assert ci.prediction_type(v_model) == "V_PREDICTION"


@pytest.mark.parametrize("sampling,zsnr,epsilon,sd_schedule", [("eps", False, True, True),
                                                               ("eps", True, True, False),
                                                               ("v_prediction", False, False, True),
                                                               ("lcm", False, False, False)])
def test_model_sampling_prediction_and_sigmas(tiny_sd2, sampling, zsnr, epsilon, sd_schedule):
    # The stock node; imported here: ComfyUI's node modules take 1.6 s to import, which the
    # pytest worker that does not run this file would spend collecting it.
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    model, _vae = tiny_sd2
    patched = ModelSamplingDiscrete().patch(model, sampling, zsnr)[0]
    obj = patched.get_model_object("model_sampling")
    assert ci.sampling_predicts_epsilon(obj) is epsilon
    sigmas = ci.sampling_sigmas(obj)
    abar = alphas_cumprod()
    expected = ((1 - abar) / abar).sqrt()
    assert sigmas is not None and sigmas.ndim == 1              # LCM: 50 of them
    same = sigmas.shape == expected.shape and torch.allclose(sigmas.double(), expected, rtol=1e-4, atol=0)
    assert same is sd_schedule
    assert ci.sampling_predicts_epsilon(model.get_model_object("model_sampling"))


def test_vae_latent_format(tiny_sd2):
    _model, vae = tiny_sd2
    assert ci.vae_latent_format(vae) == (4, 2)


def test_bare_autoencoder_computes_what_the_vae_wrapper_does(tiny_sd2):
    # The trainer's VAE steps (pipeline.autoencoder_encode/decode on ci.vae_autoencoder) against
    # ComfyUI's own VAE.encode/decode on the same image; the autoencoder is the patched module.
    model, vae = tiny_sd2
    ae = ci.vae_autoencoder(vae)
    assert ae is vae.patcher.model
    pixels = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = pipeline.autoencoder_encode(ae, model.model, pixels)
        ref = model.model.process_latent_in(vae.encode(pixels.movedim(1, -1)))
        _close(ours, ref, 1e-5)
        assert ours.shape == (1, 4, 4, 6)
        decoded = pipeline.autoencoder_decode(ae, model.model, ours)
        _close(decoded.clamp(0, 1), vae.decode(model.model.process_latent_out(ours)).movedim(-1, 1), 1e-5)


def test_vae_decode_memory_grows_with_the_tile_area(tiny_sd2):
    _model, vae = tiny_sd2
    small, large = (ci.vae_decode_memory(vae, [1, 4, s, s]) for s in (32, 64))
    assert small > 0 and large == pytest.approx(4 * small, rel=1e-6)


# --- weights and patches ------------------------------------------------------------------------

def _first_linear(base: torch.nn.Module) -> str:
    """The key of the first LoRA-target Linear weight of a loaded model (`diffusion_model....weight`)."""
    modules = dict(base.diffusion_model.named_modules())
    name = next(n for n in lora_target_names(base.diffusion_model) if isinstance(modules[n], torch.nn.Linear))
    return f"diffusion_model.{name}.weight"


def test_unpatched_weights_while_a_patch_is_applied(tiny_sd2):
    model, _vae = tiny_sd2
    key = _first_linear(model.model)
    mm.unload_all_models()                                      # no clone of it patched in now
    original = model.model.state_dict()[key].clone()
    clone = model.clone()
    clone.add_patches({key: ("diff", (torch.ones_like(original),))}, 1.0)
    mm.load_models_gpu([clone])
    try:
        live = model.model.state_dict()[key]
        assert torch.equal(live, original + 1)                  # the shared weight is patched now
        assert torch.equal(ci.unpatched_weights(clone, [key])[key], original)
    finally:
        mm.unload_all_models()
    assert torch.equal(model.model.state_dict()[key], original)
    assert torch.equal(ci.unpatched_weights(model, [key])[key], original)   # not patched: the live one


def test_unet_lora_key_map_maps_ldm_and_kohya_names(tiny_sd2):
    model, _vae = tiny_sd2
    key_map = ci.unet_lora_key_map(model.model)
    state = model.model.state_dict()
    names = lora_target_names(model.model.diffusion_model)
    assert names
    for name in names:
        assert key_map[f"diffusion_model.{name}"] == f"diffusion_model.{name}.weight" in state
    kohya = "lora_unet_" + names[0].replace(".", "_")
    assert key_map[kohya] == f"diffusion_model.{names[0]}.weight"


def test_lora_patches_add_alpha_over_rank_b_a(tiny_sd2):
    model, _vae = tiny_sd2
    key = _first_linear(model.model)
    name = key[: -len(".weight")]
    mm.unload_all_models()
    weight = model.model.state_dict()[key].clone()
    gen = torch.Generator().manual_seed(1)
    rank, alpha = 2, 3.0
    a = torch.randn(rank, weight.shape[1], generator=gen)
    b = torch.randn(weight.shape[0], rank, generator=gen)
    state = D3SRWeights(lora={name: (a, b, alpha)}, text_embedding=torch.zeros(EMBEDDING_SHAPE),
                        timestep=399).lora_state_dict()          # the names our files use
    patches = ci.lora_patches(state, {name: key, "diffusion_model.not_there": "nope.weight"})
    assert list(patches) == [key]                                 # unreadable: left out, counted by us
    clone = model.clone()
    clone.add_patches(patches, 0.5)
    mm.load_models_gpu([clone])
    try:
        patched = model.model.state_dict()[key].double()
    finally:
        mm.unload_all_models()
    expected = weight.double() + 0.5 * (alpha / rank) * (b.double() @ a.double())
    _close(patched, expected, 1e-6)
    assert torch.equal(model.model.state_dict()[key], weight)


def test_patched_vae_clone_leaves_the_users_vae_alone(tiny_sd2):
    _model, vae = tiny_sd2
    key = "encoder.conv_in.bias"
    assert key in ci.vae_autoencoder(vae).state_dict()
    pixels = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(2))
    before = vae.encode(pixels)
    clone = ci.patched_vae_clone(vae, {key: ("diff", (torch.full((128,), 0.5),))})
    assert clone.patcher is not vae.patcher and not vae.patcher.patches
    adapted = clone.encode(pixels)
    after = vae.encode(pixels)
    assert float((adapted - before).detach().abs().max()) > 1e-3
    assert torch.equal(after, before)


# --- attention ----------------------------------------------------------------------------------

def test_attention_flags_are_read_from_the_command_line_options(monkeypatch):
    assert not ci.attention_flag_given()          # the test host starts without one
    for flag in ci.ATTENTION_FLAGS:
        assert hasattr(args, flag), flag
        monkeypatch.setattr(args, flag, True)
        assert ci.attention_flag_given()
        monkeypatch.setattr(args, flag, False)


def test_cpu_default_attention_is_sub_quadratic():
    # ComfyUI's choice for a CPU device without attention flags (what the D3SR clone replaces).
    assert ci.default_attention_is_sub_quadratic(), (
        f"ComfyUI's CPU attention is now {attention.optimized_attention.__name__}: "
        "model.prefer_fused_cpu_attention no longer applies")


def test_attention_override_is_called_and_fused_attention_matches(tiny_sd2, monkeypatch):
    model, _vae = tiny_sd2
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 64, 128, generator=gen) for _ in range(3))
    _close(ci.fused_attention(attention.attention_sub_quad, q, k, v, 2),
           attention.attention_sub_quad(q, k, v, 2), 1e-5)

    calls = []

    def counting(func, *a, **kw):
        calls.append(func)
        return ci.fused_attention(func, *a, **kw)
    clone = model.clone()
    assert ci.set_attention_override(clone, counting)
    assert not ci.set_attention_override(clone, ci.fused_attention)          # an existing one is kept
    assert clone.model_options["transformer_options"][ci.ATTENTION_OVERRIDE_KEY] is counting
    assert ci.ATTENTION_OVERRIDE_KEY not in model.model_options.get("transformer_options", {})
    z = torch.randn(1, 4, 8, 8, generator=gen)
    ctx = torch.randn(1, 77, 1024, generator=gen)
    opts = clone.model_options["transformer_options"]
    with torch.no_grad():
        out = pipeline.predict_x0(model.model, z, 399, ctx, opts)
        ref = pipeline.predict_x0(model.model, z, 399, ctx, {})
    assert calls, "ComfyUI's attention did not call the model's optimized_attention_override"
    _close(out, ref, 1e-5)


# --- building ComfyUI's networks ----------------------------------------------------------------

def test_build_unet_and_vae_have_the_real_layouts(tiny_sd2):
    unet = ci.build_unet(SD21_UNET_CONFIG, device="meta")
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724      # SD2.1-base's UNet
    vae = ci.build_kl_vae(KL_VAE_DDCONFIG, device="meta")
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863        # SD's KL VAE
    model, loaded_vae = tiny_sd2                                         # names = the loader's
    tiny = ci.build_unet(synthetic.TINY_SD2_UNET_CONFIG, device="meta")
    assert {k: v.shape for k, v in tiny.state_dict().items()} == \
        {k: v.shape for k, v in model.model.diffusion_model.state_dict().items()}
    assert {k: v.shape for k, v in vae.state_dict().items()} == \
        {k: v.shape for k, v in ci.vae_autoencoder(loaded_vae).state_dict().items()}
    assert next(ci.build_unet(synthetic.TINY_SD2_UNET_CONFIG, dtype=torch.float16).parameters()).dtype \
        == torch.float16


@pytest.fixture(scope="module")
def mini_sdxl() -> torch.nn.Module:
    return synthetic.build_unet(synthetic.MINI_SDXL_UNET_CONFIG, seed=6)


def test_encoder_half_matches_the_unets_own_forward(mini_sdxl):
    # unet_embedding + run_block over input and middle blocks = what UNetModel.forward feeds its
    # output blocks (captured with a hook on the middle block's last layer: the UNet calls the
    # layers, not the block), so the discriminator's half-UNet computes the real UNet's features.
    unet = mini_sdxl
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    y = torch.randn(2, 2816, generator=gen)
    ctx = torch.randn(2, 77, 2048, generator=gen)
    seen = {}
    hook = unet.middle_block[-1].register_forward_hook(lambda _m, _i, out: seen.setdefault("mid", out))
    try:
        with torch.no_grad():
            unet(x, timesteps=t, context=ctx, y=y)
    finally:
        hook.remove()
    with torch.no_grad():
        emb = ci.unet_embedding(unet, t, y, torch.float32)
        h = x
        for block in unet.input_blocks:
            h = ci.run_block(block, h, emb, ctx)
        h = ci.run_block(unet.middle_block, h, emb, ctx)
    assert "mid" in seen
    _close(h, seen["mid"], 1e-6)
    assert ci.encoder_channels(unet) == h.shape[1] == 128


def test_drop_unet_decoder_keeps_the_encoder_half(mini_sdxl):
    unet = ci.drop_unet_decoder(copy.deepcopy(mini_sdxl))
    assert not hasattr(unet, "output_blocks") and not hasattr(unet, "out")
    kept = {k.split(".")[0] for k in unet.state_dict()}
    assert kept == {"time_embed", "label_emb", "input_blocks", "middle_block"}
    full = mini_sdxl.state_dict()
    assert all(torch.equal(v, full[k]) for k, v in unet.state_dict().items())


def test_size_conditioning_equals_comfyuis_sdxl_adm():
    base = comfy.supported_models.SDXL(dict(synthetic.MINI_SDXL_UNET_CONFIG)).get_model({}, device="meta")
    assert isinstance(base, comfy.model_base.SDXL)
    pooled = torch.randn(1, 1280, generator=torch.Generator().manual_seed(6))
    ref = base.encode_adm(pooled_output=pooled, height=512, width=384)
    ours = size_conditioning(pooled, 512, 384)
    assert ours.shape == ref.shape == (1, 2816)
    assert torch.equal(ours, ref.float())
    assert torch.equal(ci.sinusoidal_embedding(512, 256), base.embedder(torch.Tensor([512])))


def test_unet_calls_each_block_layer_as_its_own_module():
    unet = synthetic.build_unet(synthetic.TINY_SD2_UNET_CONFIG, seed=7)
    gen = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 1024, generator=gen)
    t = torch.tensor([399])
    opts = {ci.ATTENTION_OVERRIDE_KEY: ci.fused_attention}
    with torch.no_grad():
        ref = unet(x, timesteps=t, context=ctx, transformer_options=dict(opts))
    layers = ci.unet_block_layers(unet)
    calls = [0] * len(layers)

    def counted(i, forward):
        def wrapped(*a, **kw):
            calls[i] += 1
            return forward(*a, **kw)
        return wrapped
    for i, layer in enumerate(layers):
        layer.forward = counted(i, layer.forward)
    block_calls = []
    unet.middle_block.forward = lambda *a, **kw: block_calls.append(1)   # never called by the UNet
    with torch.no_grad():
        out = unet(x, timesteps=t, context=ctx, transformer_options=dict(opts))
    assert calls == [1] * len(layers) and not block_calls
    assert torch.equal(out, ref)


def test_lora_layers_are_torch_layers_called_with_their_input():
    # training.lora.LoRASet adds B(A(x)) in a forward hook on these layers: ComfyUI must call each
    # as a module, with x first, and keep torch's weight layout.
    import comfy.ops
    unet = synthetic.build_unet(synthetic.TINY_SD2_UNET_CONFIG, seed=8)
    modules = dict(unet.named_modules())
    names = lora_target_names(unet)
    assert names and all(ci.is_linear_or_conv(modules[n]) for n in names)
    assert all(type(modules[n]).__module__ == comfy.ops.__name__ for n in names)
    assert not ci.is_linear_or_conv(unet.middle_block)
    seen: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            fan_in = module.weight.shape[1]
            assert x.shape[-1 if isinstance(module, torch.nn.Linear) else 1] == fan_in, name
            seen[name] = seen.get(name, 0) + 1
        return record
    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    gen = torch.Generator().manual_seed(8)
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, 8, 8, generator=gen), timesteps=torch.tensor([399]),
                 context=torch.randn(1, 77, 1024, generator=gen))
    finally:
        for h in handles:
            h.remove()
    assert seen == dict.fromkeys(names, 1)


# --- names and layouts --------------------------------------------------------------------------

def test_unet_diffusers_names_cover_every_sd21_parameter():
    name_map = ci.unet_diffusers_to_ldm(SD21_UNET_CONFIG)
    for diffusers, ldm in {
            "conv_in.weight": "input_blocks.0.0.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight":
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            "down_blocks.1.resnets.0.conv_shortcut.weight": "input_blocks.4.0.skip_connection.weight",
            "mid_block.attentions.0.proj_in.weight": "middle_block.1.proj_in.weight",
            "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.weight":
                "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight",
            "conv_out.weight": "out.2.weight"}.items():
        assert name_map[diffusers] == ldm
    params = ci.build_unet(SD21_UNET_CONFIG, device="meta").state_dict()
    assert set(params) <= set(name_map.values())              # every parameter has a diffusers name


def test_vae_diffusers_names_map_to_the_kl_vae():
    pairs = {"encoder.conv_in.weight": "encoder.conv_in.weight",
             "encoder.down_blocks.0.resnets.0.conv1.weight": "encoder.down.0.block.0.conv1.weight",
             "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": "encoder.down.1.block.0.nin_shortcut.weight",
             "encoder.down_blocks.0.downsamplers.0.conv.weight": "encoder.down.0.downsample.conv.weight",
             "encoder.mid_block.resnets.1.conv2.weight": "encoder.mid.block_2.conv2.weight",
             "encoder.mid_block.attentions.0.to_q.weight": "encoder.mid.attn_1.q.weight",
             "encoder.mid_block.attentions.0.to_out.0.weight": "encoder.mid.attn_1.proj_out.weight",
             "encoder.conv_norm_out.weight": "encoder.norm_out.weight",
             "quant_conv.weight": "quant_conv.weight"}
    assert ci.vae_diffusers_to_ldm(list(pairs)) == pairs
    params = ci.build_kl_vae(KL_VAE_DDCONFIG, device="meta").state_dict()
    assert set(pairs.values()) <= set(params)


@pytest.mark.parametrize("config,family,comfy_name", [(synthetic.TINY_SD2_UNET_CONFIG, "tiny SD2", "SD20"),
                                                      (SD21_UNET_CONFIG, "SD2.1-base", "SD20"),
                                                      (SDXL_UNET_CONFIG, "SDXL-base", "SDXL")])
def test_unet_config_is_detected_from_shapes_alone(config, family, comfy_name):
    shapes = {PREFIX + k: v for k, v in ci.build_unet(config, device="meta").state_dict().items()}
    detected = ci.detect_unet_config(shapes, PREFIX)
    for key in ("context_dim", "model_channels", "channel_mult", "adm_in_channels",
                "use_linear_in_transformer", "transformer_depth"):
        assert detected.get(key) == config.get(key), (family, key)
    assert ci.supported_model_name(detected) == comfy_name
    assert ci.detect_unet_config({"first_stage_model.x": torch.empty(1)}, PREFIX) is None


# --- text encoders ------------------------------------------------------------------------------

def test_sd_clip_tokenizer_parts_give_comfyuis_own_tokens(sd2_clip):
    tok = ci.clip_tokenizer(sd2_clip)
    assert tok is not None and tok.name == "h"
    empty = [t for t, _w in sd2_clip.tokenize("")["h"][0]]
    assert empty[:2] == [tok.start, tok.end] and empty[2:] == [tok.pad] * 75
    for text in ("a photo of a cat", "red bricks, wet street at night"):  # no prompt syntax: alike
        ours = literal_tokens(sd2_clip, text)["h"][0]
        comfy = [(t, w) for t, w in sd2_clip.tokenize(text)["h"][0]]
        assert [t for t, _w in ours] == [t for t, _w in comfy], text
    assert ci.clip_tokenizer(object()) is None


def test_sdxl_text_encoder_tensors_are_recognised():
    # The full build (CLIP-L + bigG, 0.8 B parameters) is checked against ComfyUI's SDXLClipModel
    # in test_training_options.py::test_discriminator_conditioning_comes_from_the_sdxl_text_encoders;
    # here only what decides whether there are any and where they go.
    config = comfy.supported_models.SDXL(dict(synthetic.MINI_SDXL_UNET_CONFIG))
    names = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": "clip_l.",
             "conditioner.embedders.1.model.ln_final.bias": "clip_g."}
    converted = config.process_clip_state_dict({k: torch.zeros(1) for k in names})
    assert sorted(k.split(".")[0] + "." for k in converted) == sorted(names.values())
    assert ci.sdxl_text_encoders(dict(synthetic.MINI_SDXL_UNET_CONFIG), {}) is None

