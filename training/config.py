"""Training configuration: YAML -> nested dataclasses, with unknown keys and bad values rejected.

Every value is checked against its field's type when the file is read (a whole number for int
fields, booleans refused as numbers, finite numbers for float fields; a number PyYAML leaves as
a string, such as `5e-5`, is read as that number; `folders: data/x` is one folder) and then
against its range (`validate`), before anything is loaded. Errors are one line naming the key.

Defaults are D3SR.md's (paper, or ours where the paper is silent; marked "ours"). The choices
that shape what the model learns, and whose they are (docs/training.md, "Paper or ours"):
- generator.train_embedding false: the paper's (Fig. 1: only the UNet LoRA is trained); true is ours.
- data.usm_target sharpened: ours (Real-ESRGAN's convention, whose degradation the paper uses):
  the LR is made from the unsharp-masked HR and MSE + EA-DISTS target it, the discriminator's
  real sample is the plain HR. none: no sharpening anywhere (OSEDiff's code).
- loss.mse_range [0, 1]: ours; [-1, 1] (OSEDiff's code) weighs the MSE term 4x.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .degradation_config import DegradationConfig, config_problems


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
    train_embedding: bool = False  # paper (Fig. 1): the embedding stays frozen; true (train it) is ours


@dataclass
class DiscriminatorConfig:
    lora_rank: int = 16
    lora_alpha: float = 16.0
    head_channels: int | None = None  # hidden width of the head; None = middle-block width (1280)


@dataclass
class LossConfig:
    lambda_perceptual: float = 1.0   # lambda2, EA-DISTS (ours)
    lambda_gan: float = 0.5          # lambda1 (ours)
    # Pixel range the MSE term is computed on (images mapped from [0, 1] first); ours. [-1, 1]
    # (OSEDiff's code) gives 4x the [0, 1] value, i.e. a 4x heavier MSE against the other terms.
    mse_range: tuple[float, float] = (0.0, 1.0)
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
    ema_decay: float | None = None    # EMA of the generator LoRA + embedding, exported when set; 0/null = off
    timestep_sharing: bool = True     # ours: real and fake of one sample share t (noise differs)
    d_timesteps: tuple[int, int] = (0, 999)  # range of the discriminator's t (paper: U{0..999})


@dataclass
class DataConfig:
    folders: list[str] = field(default_factory=list)  # one string = one folder
    degradation: str = "realesrgan"   # realesrgan (training.degradation) | bicubic (tests, quick runs)
    # Every probability and range of the Real-ESRGAN pipeline (defaults: Real-ESRGAN's x4 options;
    # see training/degradation.py). Its `scale` is ignored: train.scale is used.
    realesrgan: DegradationConfig = field(default_factory=DegradationConfig)
    # The training pair (training.data.training_pair). sharpened (ours; Real-ESRGAN's convention):
    # the HR crop is unsharp-masked once, the LR is made from it and MSE + EA-DISTS target it; the
    # discriminator's real sample is the plain HR. none (OSEDiff's code): no sharpening at all.
    usm_target: str = "sharpened"
    usm_weight: float = 0.5           # Real-ESRGAN's unsharp mask: amount,
    usm_threshold: float = 10.0       # residual threshold on the 0..255 scale,
    usm_radius: int = 50              # blur kernel size (made odd: 51; sigma 8 as OpenCV derives it)
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


MSE_RANGES = ((0.0, 1.0), (-1.0, 1.0))
USM_TARGETS = ("sharpened", "none")
# Keys that moved: the message names the new place.
_MOVED = {
    "data.realesrgan.usm_sharpen": "data.usm_target (sharpened | none)",
    "data.realesrgan.usm_weight": "data.usm_weight",
    "data.realesrgan.usm_threshold": "data.usm_threshold",
    "data.realesrgan.usm_radius": "data.usm_radius",
}

# A number as YAML writes it; PyYAML (YAML 1.1) leaves exponents without a dot ("5e-5") as strings.
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _show(value: Any) -> str:
    """`value` as the config file would spell it (true, null, "text", 1.5)."""
    return json.dumps(value, default=str)


def _number(value: Any) -> int | float | None:
    """An int/float from a YAML number or a numeric string; None for anything else (bools too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip()
        return float(text) if any(c in text for c in ".eE") else int(text)
    return None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against the field's type `hint` (and converted: a numeric string to its
    number, a whole float to int, a list to a tuple, one string to a one-item list of strings).
    Raises ConfigError naming `where` for anything else."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(value, hint, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {_show(value)}")
        return value
    if hint is int:
        n = _number(value)
        if n is None or (isinstance(n, float) and not (math.isfinite(n) and n.is_integer())):
            raise ConfigError(f"{where} must be a whole number, got {_show(value)}")
        return int(n)
    if hint is float:
        n = _number(value)
        if n is None or not math.isfinite(n):
            raise ConfigError(f"{where} must be a finite number, got {_show(value)}")
        return float(n)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a text string, got {_show(value)}")
        return value
    if origin is list:
        if isinstance(value, str):  # `folders: data/x` means one folder, not a list of characters
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {_show(value)}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {_show(value)}")
        items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(value) != len(items):
            raise ConfigError(f"{where} must be a list of {len(items)} values, got {_show(value)}")
        return tuple(_coerce(v, h, f"{where}[{i}]") for i, (v, h) in enumerate(zip(value, items)))
    return value


def _build(base, data: dict, where: str):
    """A copy of the dataclass instance `base` with the values in `data`, each checked against its
    field's type (`_coerce`). Nested sections update the nested defaults: e.g.
    data.realesrgan.second keeps the second stage's other values."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where or 'top level'}' must be a mapping, got {_show(data)}")
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(data) - fields)
    for name in unknown:
        moved = _MOVED.get(f"{where}.{name}".lstrip("."))
        if moved:
            raise ConfigError(f"config key '{where}.{name}' has moved: set {moved} instead "
                              f"(the unsharp mask belongs to the training pair, not the degradation)")
    if unknown:
        raise ConfigError(f"unknown config key(s) in '{where or 'top level'}': {', '.join(map(str, unknown))} "
                          f"(known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(type(base))
    kwargs = {}
    for name, value in data.items():
        default, key = getattr(base, name), f"{where}.{name}".lstrip(".")
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(default, {} if value is None else value, key)
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    return dataclasses.replace(base, **kwargs)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> tuple[bool, str]:
    return value in allowed, f"{name} '{value}' is not one of {'/'.join(allowed)}"


def _at_least(name: str, value: float, low: float) -> tuple[bool, str]:
    return value >= low, f"{name} must be >= {low}, got {value}"


def _positive(name: str, value: float) -> tuple[bool, str]:
    return value > 0, f"{name} must be > 0, got {value}"


def _model_checks(cfg: Config) -> list[tuple[bool, str]]:
    """(ok, message) for the networks, the loss and the optimizer."""
    g, d, o = cfg.generator, cfg.discriminator, cfg.optim
    return [
        _at_least("seed", cfg.seed, 0),
        (1 <= g.timestep <= 999, f"generator.timestep (T_L) must be in 1..999, got {g.timestep}"),
        _at_least("generator.lora_rank", g.lora_rank, 1),
        _positive("generator.lora_alpha", g.lora_alpha),
        _at_least("discriminator.lora_rank", d.lora_rank, 1),
        _positive("discriminator.lora_alpha", d.lora_alpha),
        (d.head_channels is None or d.head_channels >= 1,
         f"discriminator.head_channels must be >= 1 or null, got {d.head_channels}"),
        _at_least("loss.lambda_perceptual", cfg.loss.lambda_perceptual, 0),
        _at_least("loss.lambda_gan", cfg.loss.lambda_gan, 0),
        _one_of("loss.perceptual", cfg.loss.perceptual, ("ea_dists", "dists", "none")),
        (tuple(cfg.loss.mse_range) in MSE_RANGES,
         f"loss.mse_range must be [0, 1] or [-1, 1], got {list(cfg.loss.mse_range)}"),
        _positive("optim.lr_generator", o.lr_generator),
        _positive("optim.lr_discriminator", o.lr_discriminator),
        (all(0 <= b < 1 for b in o.betas), f"optim.betas must both be in [0, 1), got {list(o.betas)}"),
        _at_least("optim.weight_decay", o.weight_decay, 0),
        (o.grad_clip is None or o.grad_clip > 0,
         f"optim.grad_clip must be > 0 (or null: no clipping), got {o.grad_clip}"),
        (o.grad_accum >= 1, "optim.grad_accum must be >= 1"),
    ]


def _run_checks(cfg: Config) -> list[tuple[bool, str]]:
    """(ok, message) for the training schedule, the data, the device, logging and the paths."""
    t, o, lg = cfg.train, cfg.optim, cfg.log
    # Real-ESRGAN's blurs pad by up to 10 pixels (reflect): its smallest intermediate image (crop x
    # 0.15 after the first resize) and the LR (crop / scale) must stay above 21 pixels.
    min_crop = max(148, 22 * t.scale)
    checks = [
        (cfg.output_dir.strip() != "", "output_dir is empty: set the folder the run writes to"),
        (t.steps >= 1, f"train.steps must be >= 1, got {t.steps}"),
        (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
        (o.grad_accum < 1 or t.batch_size % o.grad_accum == 0,
         f"train.batch_size ({t.batch_size}) must be divisible by optim.grad_accum ({o.grad_accum})"),
        _at_least("train.scale", t.scale, 1),
        (t.scale < 1 or t.crop % t.scale == 0,
         f"train.crop ({t.crop}) must be a multiple of train.scale ({t.scale})"),
        (t.crop % 8 == 0 and t.crop >= 16, f"train.crop ({t.crop}) must be a multiple of 8 and >= 16"),
        _one_of("train.precision", t.precision, ("auto", "bf16", "fp16", "fp32")),
        _one_of("train.frozen_dtype", t.frozen_dtype, ("auto", "bf16", "fp16", "fp32")),
        (t.ema_decay is None or 0.0 <= t.ema_decay < 1.0,
         f"train.ema_decay must be in [0, 1) or null (0 and null: no EMA), got {t.ema_decay}"),
        (0 <= t.d_timesteps[0] <= t.d_timesteps[1] <= 999,
         f"train.d_timesteps must be [lo, hi] with 0 <= lo <= hi <= 999, got {list(t.d_timesteps)}"),
        _one_of("data.degradation", cfg.data.degradation, ("realesrgan", "bicubic")),
        (cfg.data.degradation != "realesrgan" or t.crop >= min_crop,
         f"train.crop {t.crop} is too small for the Real-ESRGAN degradation (needs >= {min_crop} "
         f"at scale {t.scale}); use a larger crop or data.degradation: bicubic"),
        _one_of("data.usm_target", cfg.data.usm_target, USM_TARGETS),
        _at_least("data.usm_weight", cfg.data.usm_weight, 0),
        _at_least("data.usm_threshold", cfg.data.usm_threshold, 0),
        _at_least("data.usm_radius", cfg.data.usm_radius, 1),
        _at_least("data.num_workers", cfg.data.num_workers, 0),
        _at_least("data.prefetch_factor", cfg.data.prefetch_factor, 1),
        _one_of("device", cfg.device, ("auto", "cpu", "cuda")),
        (lg.checkpoint_every >= 1, "log.checkpoint_every must be >= 1"),
        (lg.every >= 1, "log.every must be >= 1"),
        (lg.eval_every >= 1, "log.eval_every must be >= 1"),
        (lg.sample_every >= 0, "log.sample_every must be >= 0 (0 = no samples)"),
        _at_least("log.keep_checkpoints", lg.keep_checkpoints, 0),
    ]
    for name, path in (("models.embedding_file", cfg.models.embedding_file),
                       ("models.sdxl_conditioning_file", cfg.models.sdxl_conditioning_file),
                       ("loss.vgg_path", cfg.loss.vgg_path)):
        checks.append((path is None or os.path.isfile(path), f"{name} '{path}' is not a file (or set it to null)"))
    return checks


def validate(cfg: Config) -> Config:
    """Raise ConfigError (one line naming the key) for values that cannot work; returns cfg.
    Types are checked when the file is read (`_coerce`); this checks ranges and combinations."""
    for ok, message in _model_checks(cfg) + _run_checks(cfg):
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
