"""Training configuration: YAML -> nested dataclasses, with unknown keys and bad values rejected.

Defaults are D3SR.md's (paper, or ours where the paper is silent; marked "ours").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from .degradation import DegradationConfig, config_problems


class ConfigError(ValueError):
    """A config file with an unknown key or an invalid value."""


@dataclass
class ModelsConfig:
    generator: str = ""                       # SD2.1-base checkpoint (UNet + VAE [+ text encoder])
    discriminator: str = ""                   # SDXL 1.0-base checkpoint (UNet [+ text encoders])
    embedding_file: str | None = None         # precomputed [1, 77, 1024] 'text_embedding' (skips CLIP)
    sdxl_conditioning_file: str | None = None  # precomputed 'context' [1,77,2048] + 'pooled' [1,1280]


@dataclass
class GeneratorConfig:
    timestep: int = 399        # T_L (ours: the paper says "intermediate")
    lora_rank: int = 16
    lora_alpha: float = 16.0
    train_embedding: bool = True  # ours: the fixed embedding is trained with the LoRA


@dataclass
class DiscriminatorConfig:
    lora_rank: int = 16
    lora_alpha: float = 16.0
    head_channels: int | None = None  # hidden width of the head; None = middle-block width (1280)


@dataclass
class LossConfig:
    lambda_perceptual: float = 1.0   # lambda2, EA-DISTS (ours)
    lambda_gan: float = 0.5          # lambda1 (ours)
    perceptual: str = "ea_dists"     # ea_dists | dists | none
    pretrained_vgg: bool = True      # False: seeded random VGG + uniform alpha/beta (tests only)
    vgg_path: str | None = None      # torchvision-format VGG16 file (else training.pretrained fetches it)


@dataclass
class OptimConfig:
    lr_generator: float = 5e-5
    lr_discriminator: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01        # ours (torch's AdamW default)
    grad_clip: float | None = 1.0     # max global grad norm per network (ours); null = off
    grad_accum: int = 1


@dataclass
class TrainConfig:
    steps: int = 100_000
    batch_size: int = 8               # global batch (all ranks, all accumulation micro-steps)
    crop: int = 512                   # HR crop side (pixels)
    scale: int = 4                    # LR = HR / scale
    precision: str = "auto"           # auto (bf16 on CUDA when supported, else fp32) | bf16 | fp16 | fp32
    frozen_dtype: str = "auto"        # dtype of the frozen UNets: auto (= compute dtype) | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    ema_decay: float | None = None    # EMA of the generator LoRA + embedding; exported when set
    timestep_sharing: bool = True     # ours: real and fake of one sample share t (noise differs)
    d_timesteps: tuple[int, int] = (0, 999)  # range of the discriminator's t (paper: U{0..999})


@dataclass
class DataConfig:
    folders: list[str] = field(default_factory=list)
    degradation: str = "realesrgan"   # realesrgan (training.degradation) | bicubic (tests, quick runs)
    # Every probability and range of the Real-ESRGAN pipeline (defaults: Real-ESRGAN's x4 options;
    # see training/degradation.py). Its `scale` is ignored: train.scale is used.
    realesrgan: DegradationConfig = field(default_factory=DegradationConfig)
    num_workers: int = 4
    prefetch_factor: int = 2


@dataclass
class LogConfig:
    every: int = 10                   # JSONL/TensorBoard row every N steps
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 1000          # LR | output | HR side-by-side PNG; 0 = off
    eval_lr_folder: str | None = None
    eval_gt_folder: str | None = None
    eval_every: int = 5000
    tensorboard: bool = True
    progress: bool = True


@dataclass
class Config:
    output_dir: str = "runs/d3sr"
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda
    models: ModelsConfig = field(default_factory=ModelsConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def summary(self) -> dict[str, Any]:
        """A JSON-able dict of the whole config (stored in checkpoints and exported files)."""
        return dataclasses.asdict(self)


def _build(base, data: dict, where: str):
    """A copy of the dataclass instance `base` with the values in `data` (nested sections update
    the nested defaults: e.g. data.realesrgan.second keeps the second stage's other values)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where or 'top level'}' must be a mapping, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"unknown config key(s) in '{where or 'top level'}': {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        default = getattr(base, name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(default, value or {}, f"{where}.{name}".lstrip("."))
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return dataclasses.replace(base, **kwargs)


def validate(cfg: Config) -> Config:
    """Raise ConfigError for values that cannot work; returns cfg."""
    t = cfg.train
    def one_of(value, allowed, name):
        return value in allowed, f"{name} '{value}' is not one of {'/'.join(allowed)}"

    checks = [
        (1 <= cfg.generator.timestep <= 999,
         f"generator.timestep (T_L) must be in 1..999, got {cfg.generator.timestep}"),
        (t.steps >= 1, "train.steps must be >= 1"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.scale >= 1 and t.crop % t.scale == 0,
         f"train.crop ({t.crop}) must be a multiple of train.scale ({t.scale})"),
        (t.crop % 8 == 0 and t.crop >= 16, f"train.crop ({t.crop}) must be a multiple of 8 and >= 16"),
        one_of(t.precision, ("auto", "bf16", "fp16", "fp32"), "train.precision"),
        one_of(t.frozen_dtype, ("auto", "bf16", "fp16", "fp32"), "train.frozen_dtype"),
        (cfg.optim.grad_accum >= 1, "optim.grad_accum must be >= 1"),
        (cfg.optim.grad_accum < 1 or t.batch_size % cfg.optim.grad_accum == 0,
         f"train.batch_size ({t.batch_size}) must be divisible by optim.grad_accum ({cfg.optim.grad_accum})"),
        one_of(cfg.loss.perceptual, ("ea_dists", "dists", "none"), "loss.perceptual"),
        one_of(cfg.data.degradation, ("realesrgan", "bicubic"), "data.degradation"),
        one_of(cfg.device, ("auto", "cpu", "cuda"), "device"),
        (t.ema_decay is None or 0.0 < t.ema_decay < 1.0, "train.ema_decay must be in (0, 1) or null"),
        (cfg.log.checkpoint_every >= 1, "log.checkpoint_every must be >= 1"),
        (cfg.log.every >= 1, "log.every must be >= 1"),
        (cfg.log.eval_every >= 1, "log.eval_every must be >= 1"),
        (cfg.log.sample_every >= 0, "log.sample_every must be >= 0 (0 = no samples)"),
        (len(t.d_timesteps) == 2 and 0 <= t.d_timesteps[0] <= t.d_timesteps[1] <= 999,
         f"train.d_timesteps must be [lo, hi] with 0 <= lo <= hi <= 999, got {list(t.d_timesteps)}"),
    ]
    # Real-ESRGAN's blurs pad by up to 10 pixels (reflect): its smallest intermediate image (crop x
    # 0.15 after the first resize) and the LR (crop / scale) must stay above 21 pixels.
    min_crop = max(148, 22 * t.scale)
    checks.append((cfg.data.degradation != "realesrgan" or t.crop >= min_crop,
                   f"train.crop {t.crop} is too small for the Real-ESRGAN degradation (needs >= {min_crop} "
                   f"at scale {t.scale}); use a larger crop or data.degradation: bicubic"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    problems = config_problems(cfg.data.realesrgan)
    if problems:
        raise ConfigError("data.realesrgan: " + "; ".join(problems))
    if not cfg.data.folders:
        raise ConfigError("data.folders is empty: list one or more folders of HR images")
    return cfg


def load_config(path: str, overrides: dict | None = None) -> Config:
    """Read a YAML config (plus `overrides`, a nested dict merged on top) and validate it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: '{path}'") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if overrides:
        data = merge(data, overrides)
    return validate(_build(Config(), data, ""))


def merge(base: dict, extra: dict) -> dict:
    """Nested dict merge (extra wins)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k, {}), dict) else v
    return out
