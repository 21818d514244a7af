"""Evaluation during training: the eval set checked before the run, then scored at intervals."""

from __future__ import annotations

import os

from d3sr_core.image_io import ImageReadError, image_size, save_png_atomic

from .config import Config, ConfigError
from .dists import DISTS
from .evaluate import evaluate_folders, load_image, pair_files
from .lpips_alex import LPIPSAlex


def check_eval_set(cfg: Config) -> None:
    """ConfigError unless log.eval_lr_folder / eval_gt_folder pair up (every LR image has a
    ground truth of the same stem, `train.scale` times its size) and the metrics' weights load."""
    lr_dir, gt_dir = cfg.log.eval_lr_folder, cfg.log.eval_gt_folder
    for name, folder in (("eval_lr_folder", lr_dir), ("eval_gt_folder", gt_dir)):
        if not folder or not os.path.isdir(folder):
            raise ConfigError(f"log.{name} '{folder}' is not a folder (set both eval folders, or neither)")
    try:  # the pairing run_eval and training.evaluate use
        pairs = pair_files(lr_dir, gt_dir)
    except FileNotFoundError as e:
        raise ConfigError(f"evaluation set (log.eval_lr_folder, log.eval_gt_folder): {e}") from None
    scale = cfg.train.scale
    for lr_path, gt_path in pairs:
        try:
            (lw, lh), (gw, gh) = image_size(lr_path), image_size(gt_path)
        except ImageReadError as e:
            raise ConfigError(f"evaluation set (log.eval_lr_folder, log.eval_gt_folder): {e}; "
                              "replace or remove the file") from None
        if (round(lw * scale), round(lh * scale)) != (gw, gh):
            raise ConfigError(f"evaluation pair '{lr_path.stem}': LR {lw}x{lh} x{scale} is "
                              f"not the ground truth's {gw}x{gh}")
    try:
        LPIPSAlex(), DISTS()
    except Exception as e:
        raise ConfigError(f"evaluation during training needs the LPIPS and DISTS weights: {e}") from None


def run_eval(trainer, out_dir: str) -> dict[str, float]:
    """Upscale eval_lr_folder with `trainer`'s current generator into `out_dir`, then
    training.evaluate's metrics against eval_gt_folder. Returns {"eval/<metric>": mean}."""
    cfg = trainer.cfg
    for lr_path, _gt in pair_files(cfg.log.eval_lr_folder, cfg.log.eval_gt_folder):
        sr = trainer.G.super_resolve(load_image(lr_path).to(trainer.device), cfg.train.scale)
        save_png_atomic(sr.permute(0, 2, 3, 1), os.path.join(out_dir, lr_path.stem + ".png"))
    result = evaluate_folders(out_dir, cfg.log.eval_gt_folder, device=str(trainer.device),
                              with_niqe=False, progress=False)
    return {f"eval/{k}": v for k, v in result.mean.items()}
