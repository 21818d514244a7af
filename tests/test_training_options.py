"""The trainer's options against plain references (CPU, generated small models): gradient
accumulation, gradient checkpointing, EMA of the generator, bf16 autocast, evaluation during
training, the training pair's unsharp-mask convention, the MSE's pixel range and the frozen
embedding. Setup and config helpers are test_training_loop's."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_training_degradation import usm_reference
from test_training_loop import ROOT, fixed_batch, write_config

from d3sr_core.pipeline import bicubic_upsample
from devtools import synthetic
from training.config import load_config
from training.data import bicubic_degradation
from training.loop import train
from training.losses import pixel_mse
from training.trainer import Trainer


def _split(batch: dict) -> list[dict]:
    """One prepared batch of B -> B prepared batches of 1."""
    b = batch["hr"].shape[0]
    return [{k: v[i:i + 1] for k, v in batch.items()} for i in range(b)]


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The gradients the last update left: D's (from the D step) and G's (from the G step)."""
    out = {}
    for prefix, module in (("G.", trainer.G), ("D.", trainer.D)):
        for name, p in module.named_parameters():
            if p.requires_grad:
                assert p.grad is not None, prefix + name
                out[prefix + name] = p.grad.detach().clone()
    return out


def _assert_close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = max(float(a[k].abs().max()), 1e-12)
        assert float((a[k] - b[k]).abs().max()) <= rtol * scale, k
    # Not trivially equal: the gradients are not all zero.
    assert sum(float(v.abs().sum()) for v in a.values()) > 0


def _frozen_trainer(tmp_path, tiny_setup, **sections) -> Trainer:
    """A trainer whose updates leave the raw gradients and keep the weights: no clipping, and its
    optimizers' learning rates set to 0 (the config itself refuses a learning rate of 0)."""
    optim = {"grad_clip": None, **sections.pop("optim", {})}
    trainer = Trainer(load_config(write_config(tmp_path, tiny_setup, optim=optim, **sections)))
    for opt in (trainer.opt_g, trainer.opt_d):
        for group in opt.param_groups:
            group["lr"] = 0.0
    return trainer


@pytest.fixture
def float64(monkeypatch):
    """Makes trainers compute in float64, so that comparisons of two summation orders (batched and
    accumulated, recomputed and stored) do not depend on the CPU's vector width: the frozen
    networks are loaded in float64 (the trainer's precision choice answers float64), and
    `float64(trainer)` converts the trainable parameters and the perceptual network.
    float32 remains only where d3sr_core.pipeline.predict_x0 rounds the UNet's input and output
    (equal values in the two computations compared)."""
    from comfy.cli_args import args

    import training.trainer
    monkeypatch.setattr(training.trainer, "precision", lambda cfg, device: (None, torch.float64))
    # ComfyUI computes SD2's attention scores in float32 ("upcast", for fp16): for float64 queries
    # that is a downcast. Its --dont-upcast-attention option keeps them in float64.
    monkeypatch.setattr(args, "dont_upcast_attention", True)

    def convert(trainer: Trainer) -> Trainer:
        for module in (trainer.G, trainer.D, trainer.perceptual):
            module.double()
        assert next(trainer.G.base.diffusion_model.parameters()).dtype == torch.float64
        return trainer
    return convert


# float64's epsilon is 2.2e-16: even a cancellation that loses 6 digits leaves two summation
# orders within 1e-9 of a tensor's largest gradient (measured: 1e-14, with and without AVX-512);
# a missing 1/accum is off by 0.5 of it. (float32 here, on Intel without AVX-512: 7e-5; AMD: 4e-4.)
F64_RTOL = 1e-9


def test_gradient_accumulation_equals_one_large_batch(tmp_path, tiny_setup, float64):
    # Two micro-batches of 1 with loss / 2 each must give the gradients of one batch of 2 whose
    # losses are batch means (MSE, EA-DISTS, the patch-mean GAN terms), in float64 (F64_RTOL).
    # 16 x 32 crops: two discriminator patches (1 x 2 logits) at half the pixels of 32 x 32.
    hr = torch.cat([fixed_batch(1, crop=32), fixed_batch(2, crop=32)])[..., :16, :]
    one = float64(_frozen_trainer(tmp_path, tiny_setup, train={"crop": 32, "batch_size": 2}))
    batch = one.prepare(hr, 0)
    one.update([batch])
    accum = float64(_frozen_trainer(tmp_path, tiny_setup, train={"crop": 32, "batch_size": 2}, optim={"grad_accum": 2}))
    assert accum.micro_batch == 1
    accum.update(_split(batch))
    g_one, g_accum = _grads(one), _grads(accum)
    assert all(v.dtype == torch.float64 for v in g_one.values())
    _assert_close(g_one, g_accum, F64_RTOL)
    # The check catches a missing 1/accum (the micro-batch gradients summed, not averaged).
    with pytest.raises(AssertionError):
        _assert_close(g_one, {k: 2 * v for k, v in g_accum.items()}, F64_RTOL)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tiny_setup, float64):
    hr = fixed_batch(4, crop=32)[..., :16, :]      # 16 x 32: two discriminator patches
    plain = float64(_frozen_trainer(tmp_path, tiny_setup, train={"crop": 32}))
    batch = plain.prepare(hr, 0)
    m_plain = plain.update([batch])
    ckpt = float64(_frozen_trainer(tmp_path, tiny_setup, train={"crop": 32, "gradient_checkpointing": True}))
    m_ckpt = ckpt.update([batch])
    assert ckpt.D.checkpointing
    for k in ("loss_d", "loss_g", "loss_mse"):
        assert abs(m_plain[k] - m_ckpt[k]) <= 1e-9 * max(1.0, abs(m_plain[k])), k
    _assert_close(_grads(plain), _grads(ckpt), F64_RTOL)


def _saved_bytes(forward, *args) -> int:
    """Bytes of the tensors autograd keeps for backward while `forward(*args)` runs (checkpointed
    regions keep theirs through their own inner hooks, so they are not counted here)."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(*args)
    return total[0]


def test_gradient_checkpointing_frees_activations(tmp_path, tiny_setup):
    # Checkpointing must really drop the blocks' activations (ComfyUI's UNet calls the layers inside
    # each block, so wrapping the wrong module is a silent no-op): G and D each keep under half.
    batch = fixed_batch(4, crop=32)
    kept = {}
    for on in (False, True):
        trainer = _frozen_trainer(tmp_path, tiny_setup, train={"crop": 32, "gradient_checkpointing": on})
        b = trainer.prepare(batch, 0)
        kept[on] = (_saved_bytes(trainer.G, b["z_l"]),
                    _saved_bytes(trainer.D, b["z_h"], b["t_real"], (32, 32)))
    for i, net in enumerate(("G", "D")):
        assert kept[True][i] < 0.5 * kept[False][i], (net, kept)


def test_adversarial_gradient_reaches_g_but_not_d(tmp_path, tiny_setup):
    # lambda_gan changes only the G step: G's gradients differ between 0 and 0.5, while D's
    # gradients (from its own step) are bit-identical, so the G step added nothing to them.
    batch = fixed_batch(6, crop=32)
    grads = {}
    for lam in (0.0, 0.5):
        trainer = _frozen_trainer(tmp_path, tiny_setup, train={"crop": 32}, loss={"lambda_gan": lam})
        trainer.update([trainer.prepare(batch, 0)])
        grads[lam] = _grads(trainer)
    g_keys = [k for k in grads[0.0] if k.startswith("G.")]
    d_keys = [k for k in grads[0.0] if k.startswith("D.")]
    assert g_keys and d_keys
    for k in d_keys:
        assert torch.equal(grads[0.0][k], grads[0.5][k]), k
    diff = max(float((grads[0.0][k] - grads[0.5][k]).abs().max()) for k in g_keys)
    scale = max(float(grads[0.0][k].abs().max()) for k in g_keys)
    assert diff > 1e-3 * scale, (diff, scale)


def test_config_rejects_values_that_cannot_work(tmp_path, tiny_setup):
    from training.config import ConfigError
    for sections, message in (({"log": {"every": 0}}, "log.every must be >= 1"),
                              ({"log": {"eval_every": 0}}, "log.eval_every must be >= 1"),
                              ({"train": {"batch_size": 3}, "optim": {"grad_accum": 2}},
                               r"train.batch_size \(3\) must be divisible by optim.grad_accum \(2\)")):
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path, tiny_setup, **sections))


def test_ema_follows_its_formula_and_is_exported(tmp_path, tiny_setup):
    decay = 0.8
    trainer = Trainer(load_config(write_config(tmp_path, tiny_setup, optim={"lr_generator": 1e-2},
                                               train={"ema_decay": decay})))
    expected = {k: v.double() for k, v in trainer.G.state_dict().items()}   # e_0 = p_0
    for step in range(3):
        trainer.train_step([fixed_batch(step)])
        for k, v in trainer.G.state_dict().items():                         # e_k = d e_(k-1) + (1-d) p_k
            expected[k] = decay * expected[k] + (1 - decay) * v.double()
    # float32 EMA against the formula in float64: each of the 3 updates rounds ~3 times, by at
    # most half a float32 step of the tensor's largest value each (measured: 1.5 steps).
    eps = torch.finfo(torch.float32).eps
    for k in expected:
        scale = float(expected[k].abs().max())
        assert float((trainer.ema[k].double() - expected[k]).abs().max()) <= 8 * eps * scale, k
    weights = trainer.export_weights()
    assert weights.training["ema"] is True
    name = trainer.G.lora.names[0]
    a, b, _alpha = weights.lora["diffusion_model." + name]
    key = name.replace(".", "__")
    assert torch.equal(b, trainer.ema[f"lora.lora_B.{key}"].float())
    assert torch.equal(a, trainer.ema[f"lora.lora_A.{key}"].float())
    # ...and it is not simply the live weights.
    assert not torch.equal(b, trainer.G.lora.lora_B[key].detach())


def test_resume_with_ema_newly_enabled_starts_it_from_the_loaded_weights(tmp_path, tiny_setup):
    plain = Trainer(load_config(write_config(tmp_path, tiny_setup, optim={"lr_generator": 1e-2})))
    for step in range(2):
        plain.train_step([fixed_batch(step)])
    state = plain.state_dict()
    assert state["ema"] is None
    resumed = Trainer(load_config(write_config(tmp_path, tiny_setup, optim={"lr_generator": 1e-2},
                                               train={"ema_decay": 0.9})))
    resumed.load_state_dict(state)
    for k, v in resumed.G.state_dict().items():
        assert torch.equal(resumed.ema[k], v), k
    # The loaded weights are trained ones (LoRA B starts at zero), not the fresh initialisation.
    assert any(float(v.abs().max()) > 0 for k, v in resumed.ema.items() if "lora_B" in k)


def test_bf16_autocast_step_tracks_fp32(tmp_path, tiny_setup):
    # Mixed precision on the CPU: autocast bf16 with bf16 frozen networks. Its first-step losses
    # agree with fp32 to bf16's ~3 significant digits (tolerance 3 % relative; measured at most
    # 0.6 % apart). 16 px crops: without AVX-512 BF16, PyTorch's CPU convolutions in bf16 take a
    # slow generic path (a 32 px step took 21 s, a 16 px one 4 s, on an AMD EPYC with AVX2).
    hr = fixed_batch(5, crop=16)
    rows = {}
    for p in ("fp32", "bf16"):
        trainer = Trainer(load_config(write_config(tmp_path, tiny_setup, train={"crop": 16, "precision": p})))
        assert trainer.amp_dtype == (None if p == "fp32" else torch.bfloat16)
        rows[p] = trainer.train_step([hr])
    assert next(trainer.G.base.diffusion_model.parameters()).dtype == torch.bfloat16
    for k in ("loss_mse", "loss_perceptual", "loss_d"):
        assert abs(rows["bf16"][k] - rows["fp32"][k]) <= 0.03 * abs(rows["fp32"][k]), (k, rows)


def test_evaluation_during_training_is_logged(tmp_path, tiny_setup):
    from PIL import Image
    lr_dir, gt_dir = tmp_path / "eval_lr", tmp_path / "eval_gt"
    lr_dir.mkdir()
    gt_dir.mkdir()
    for i in range(2):
        hr = fixed_batch(10 + i, crop=64)
        lr = torch.nn.functional.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True)
        for img, folder in ((hr, gt_dir), (lr, lr_dir)):
            arr = (img[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            Image.fromarray(arr).save(folder / f"im{i}.png")
    cfg = load_config(write_config(tmp_path, tiny_setup, train={"steps": 2},
                                   log={"eval_lr_folder": str(lr_dir), "eval_gt_folder": str(gt_dir),
                                        "eval_every": 2, "checkpoint_every": 2}))
    assert train(cfg) == 0
    rows = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    evals = [r for r in rows if "eval/psnr" in r]
    assert [r["step"] for r in evals] == [2]
    for k in ("eval/psnr", "eval/ssim", "eval/lpips", "eval/dists"):
        assert isinstance(evals[0][k], float) and evals[0][k] == evals[0][k], k   # a number, not NaN
    assert 0 < evals[0]["eval/psnr"] < 60
    outputs = sorted(p.name for p in (tmp_path / "out" / "eval" / "step-0000002").iterdir())
    assert outputs == ["im0.png", "im1.png"]
    assert Image.open(tmp_path / "out" / "eval" / "step-0000002" / "im0.png").size == (64, 64)


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    import logging

    from PIL import Image

    from training.data import CropDataset, list_images, scan_images
    folder = tmp_path / "data" / "nested"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (24, 20), (40 * i, 90, 200)).save(folder / f"ok{i}.png")
    (folder / "garbage.jpg").write_bytes(b"not an image at all")          # header unreadable
    good = (folder / "ok0.png").read_bytes()
    (tmp_path / "data" / "truncated.png").write_bytes(good[:60])           # header fine, pixels cut
    with caplog.at_level(logging.WARNING, logger="d3sr.train"):
        usable, unreadable = scan_images(list_images([str(tmp_path / "data")]), 16)
    assert [os.path.basename(p) for p in unreadable] == ["garbage.jpg"]
    assert sorted(os.path.basename(p) for p in usable) == ["ok0.png", "ok1.png", "ok2.png", "truncated.png"]
    assert "skipping 1 unreadable image(s)" in caplog.text
    # The truncated file fails only when decoded: the dataset warns, counts it and takes the next image.
    data = CropDataset(sorted(usable, key=lambda p: "truncated" not in p), 16)
    crop = data[(0, 123)]
    assert crop.shape == (3, 16, 16) and data.failures == 1
    assert torch.allclose(crop[:, 0, 0] * 255, torch.tensor([0.0, 90.0, 200.0]))    # ok0's colour


def test_degradation_options_come_from_the_config(tmp_path, tiny_setup):
    from training.config import ConfigError
    from training.data import make_degradation
    cfg = load_config(write_config(tmp_path, tiny_setup, train={"crop": 256, "scale": 4},
                                   data={"degradation": "realesrgan",
                                         "realesrgan": {"second": {"noise_range": [2, 3]},
                                                        "final_sinc_prob": 0.0}}))
    options = cfg.data.realesrgan
    assert options.second.noise_range == (2, 3)
    assert options.second.blur_sigma == (0.2, 1.5)        # the second stage's other defaults stay
    assert options.first.noise_range == (1.0, 30.0)
    degrade = make_degradation("realesrgan", 4, options)
    assert degrade.config.final_sinc_prob == 0.0 and degrade.config.second.noise_range == (2, 3)
    assert cfg.summary()["data"]["realesrgan"]["final_sinc_prob"] == 0.0   # stored with checkpoints
    with pytest.raises(ConfigError, match=r"first.resize_mode_probs must be 3 non-negative probabilities"):
        load_config(write_config(tmp_path, tiny_setup, train={"crop": 256},
                                 data={"realesrgan": {"first": {"resize_mode_probs": [0.5, 0.6, 0.0]}}}))
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) in 'data.realesrgan.second': noise"):
        load_config(write_config(tmp_path, tiny_setup, data={"realesrgan": {"second": {"noise": [1, 2]}}}))


def test_embedding_starts_from_the_checkpoints_empty_prompt(tmp_path, tiny_setup, sd2_clip_file):
    # With a text encoder in the generator checkpoint, the fixed embedding starts as SD2.1's
    # encoding of "" (D3SR.md), computed here independently through ComfyUI's checkpoint loader.
    import comfy.sd

    ckpt = str(sd2_clip_file)               # tiny-sd2 with a seeded SD2 text encoder (conftest)
    models = {"generator": ckpt, "discriminator": tiny_setup["discriminator"]}
    trainer = Trainer(load_config(write_config(tmp_path, tiny_setup, models=models)))
    _m, clip, _v, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_model=False, output_vae=False)
    expected = clip.encode_from_tokens(clip.tokenize("")).float()
    assert expected.shape == (1, 77, 1024) and float(expected.abs().max()) > 0
    assert torch.allclose(trainer.G.embedding.detach(), expected, rtol=0, atol=1e-6)
    assert not trainer.G.embedding.requires_grad          # frozen by default (the paper's Fig. 1)


def test_discriminator_conditioning_comes_from_the_sdxl_text_encoders(tmp_path, tiny_setup):
    # The SDXL file's own text encoders (full-size CLIP-L + bigG, seeded) give the empty-prompt
    # context and pooled vector. Reference: the seeded SDXLClipModel the file was written from,
    # in memory (its weights held in fp16, as stored; computed in float32), fed the tokenizer's ""
    # directly.
    from comfy import sdxl_clip

    stored = synthetic.build_sdxl_text_encoders(seed=9, dtype=torch.float16)   # 0.8 B parameters
    path = synthetic.write_sdxl_checkpoint(str(tmp_path / "mini-sdxl-te.safetensors"), seed=7,
                                           text_encoders=stored, vae=False)
    # ComfyUI's text encoders (comfy.ops.manual_cast) cast each fp16 weight to float32 where it
    # is used, and run in float32: the same values as a float32 copy (checked: equal to the
    # bit), without 3.2 GB more memory. Computed, and the model freed, before the trainer loads.
    with torch.no_grad():
        context, pooled = stored.encode_token_weights(sdxl_clip.SDXLTokenizer().tokenize_with_weights(""))[:2]
    del stored
    assert float(context.abs().max()) > 0 and float(pooled.abs().max()) > 0
    models = {"generator": tiny_setup["generator"], "discriminator": path}
    trainer = Trainer(load_config(write_config(tmp_path, tiny_setup, models=models)))
    assert torch.allclose(trainer.D.context, context.float(), rtol=0, atol=1e-5)
    assert torch.allclose(trainer.D.pooled, pooled.float(), rtol=0, atol=1e-5)


def _pair_and_losses(trainer: Trainer, hr: torch.Tensor) -> tuple[dict, dict, torch.Tensor]:
    """(prepared batch, the first update's metrics, the generator's output x_hat of that update,
    computed before it: the D step does not change G)."""
    b = trainer.prepare(hr, 0)
    with torch.no_grad():
        x_hat = trainer.G.decode(trainer.G(b["z_l"]))
    return b, trainer.update([b]), x_hat


def test_training_pair_sharpened_targets_plain_real_sample(tmp_path, tiny_setup):
    # The default (data.usm_target sharpened, Real-ESRGAN's convention): the LR is made from the
    # unsharp-masked HR, MSE and EA-DISTS compare with that same sharpened image, and the
    # discriminator's real latent is the plain HR's. (Before, the LR came from a sharpened HR
    # while the losses targeted the plain one: the loss_mse check below fails on that.)
    trainer = Trainer(load_config(write_config(tmp_path, tiny_setup, train={"crop": 32})))
    assert trainer.cfg.data.usm_target == "sharpened" and trainer.cfg.loss.mse_range == (0.0, 1.0)
    hr = fixed_batch(3, crop=32)
    ref = usm_reference(hr)                                  # independent float64 unsharp mask
    b, m, x_hat = _pair_and_losses(trainer, hr)
    assert float((ref - hr.double()).abs().max()) > 0.1     # sharpening is far above the tolerance
    assert float((b["target"].double() - ref).abs().max()) <= 1e-3   # (test_training_degradation)
    # the LR is the (deterministic) bicubic degradation of the target itself, not of the HR
    down = bicubic_degradation(4)
    assert torch.equal(b["lr_up"], bicubic_upsample(down(b["target"]), (32, 32)))
    assert not torch.equal(b["lr_up"], bicubic_upsample(down(hr), (32, 32)))
    # the discriminator's real sample is the plain HR
    with torch.no_grad():
        # (prepare encodes the LR and the real sample in one batch: the same batch here)
        n = hr.shape[0]
        assert torch.equal(b["z_h"], trainer.G.encode(torch.cat([b["lr_up"], hr]))[n:])
        assert not torch.allclose(b["z_h"], trainer.G.encode(torch.cat([b["lr_up"], b["target"]]))[n:],
                                  rtol=0, atol=1e-3)
        perceptual = float(trainer.perceptual(x_hat, b["target"]).mean())
    # the losses target the sharpened HR (float32 sums of 3k terms: 1e-5 relative)
    mse_target = float(((x_hat.double() - b["target"].double()) ** 2).mean())
    mse_plain = float(((x_hat.double() - hr.double()) ** 2).mean())
    assert abs(m["loss_mse"] - mse_target) <= 1e-5 * mse_target
    assert abs(mse_plain - mse_target) > 1e-2 * mse_target   # the old target is told apart
    assert abs(m["loss_perceptual"] - perceptual) <= 1e-5 * max(perceptual, 1e-6)


def test_no_sharpening_and_mse_on_minus_one_to_one(tmp_path, tiny_setup):
    # data.usm_target none (OSEDiff's code): the target is the HR itself and the LR its
    # degradation; loss.mse_range [-1, 1] gives 4x the [0, 1] MSE of the same images.
    cfg = load_config(write_config(tmp_path, tiny_setup, train={"crop": 32}, data={"usm_target": "none"},
                                   loss={"pretrained_vgg": False, "mse_range": [-1, 1]}))
    trainer = Trainer(cfg)
    hr = fixed_batch(3, crop=32)
    b, m, x_hat = _pair_and_losses(trainer, hr)
    assert torch.equal(b["target"], hr)
    assert torch.equal(b["lr_up"], bicubic_upsample(bicubic_degradation(4)(hr), (32, 32)))
    mse01 = float(((x_hat.double() - hr.double()) ** 2).mean())
    assert abs(m["loss_mse"] - 4 * mse01) <= 1e-5 * 4 * mse01


def test_pixel_mse_on_minus_one_to_one_is_four_times_zero_to_one():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 8, 8, generator=gen, dtype=torch.float64), torch.rand(2, 3, 8, 8, generator=gen,
                                                                                   dtype=torch.float64)
    reference = float(((x - y) ** 2).mean())                   # [0, 1], float64
    assert abs(float(pixel_mse(x, y)) - reference) <= 1e-15
    assert abs(float(pixel_mse(x, y, (-1.0, 1.0))) - 4 * reference) <= 1e-14 * 4 * reference
    # computed on the mapped images, as OSEDiff's code does
    assert abs(float(pixel_mse(x, y, (-1.0, 1.0))) - float((((2 * x - 1) - (2 * y - 1)) ** 2).mean())) <= 1e-15


def test_paper_config_freezes_the_embedding_and_the_option_trains_it(tmp_path, tiny_setup):
    # The paper's config (Fig. 1: only the UNet LoRA is trained) on the tiny models: the embedding
    # has no gradient, is not in the generator's optimizer and is bit-identical after a step.
    # generator.train_embedding true (ours) trains it. A random start (models.embedding_file) so
    # that the attention layers pass it a gradient.
    from safetensors.torch import save_file
    emb = str(tmp_path / "embedding.safetensors")
    save_file({"text_embedding": torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(0))}, emb)
    tiny = {"output_dir": str(tmp_path / "out"), "device": "cpu",
            "models": {"generator": tiny_setup["generator"], "discriminator": tiny_setup["discriminator"],
                       "embedding_file": emb},
            "generator": {"lora_rank": 4, "lora_alpha": 4},
            "discriminator": {"lora_rank": 4, "lora_alpha": 4},
            "loss": {"pretrained_vgg": False},
            "train": {"steps": 1, "batch_size": 1, "crop": 16, "precision": "fp32"},
            "data": {"folders": [tiny_setup["data"]], "degradation": "bicubic", "num_workers": 0}}
    paper = str(ROOT / "training" / "configs" / "d3sr_paper.yaml")
    for option in (None, True):
        overrides = tiny if option is None else {**tiny, "generator": {**tiny["generator"], "train_embedding": True}}
        trainer = Trainer(load_config(paper, overrides))
        before = trainer.G.embedding.detach().clone()
        in_optimizer = any(p is trainer.G.embedding for group in trainer.opt_g.param_groups for p in group["params"])
        trainer.train_step([fixed_batch(5)])
        after = trainer.G.embedding.detach()
        if option is None:
            assert trainer.cfg.generator.train_embedding is False
            assert not trainer.G.embedding.requires_grad and not in_optimizer
            assert torch.equal(before, after)
            assert trainer.export_weights().text_embedding.equal(before)
        else:
            assert trainer.G.embedding.requires_grad and in_optimizer
            assert not torch.equal(before, after)
