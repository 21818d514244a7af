"""Evaluate super-resolved images against ground truth with the field's metrics.

    python -m training.evaluate --outputs DIR --gt DIR [--csv F] [--json F]
                                [--crop-border N] [--device cpu|cuda] [--no-niqe]
                                [--no-reference musiq,maniqa,clipiqa] [--iqa-weights NAME=FILE,...]

Pairs files by name stem (``a.png`` in --outputs with ``a.png`` or ``a.jpg`` in --gt); images
are read by :mod:`d3sr_core.image_io` (8-bit / 255, 16-bit / 65535, EXIF orientation applied).
Per image and on average: PSNR and SSIM on the Y channel (pyiqa's conventions, see
:mod:`training.pixel_metrics`), LPIPS (AlexNet, v0.1), DISTS and NIQE (of the output;
skipped with a message when its parameters cannot be obtained). ``--crop-border`` trims
PSNR, SSIM and NIQE inputs only, as pyiqa does. MUSIQ, MANIQA and CLIPIQA (of the output,
uncropped) are computed through pyiqa when asked with ``--no-reference`` and pyiqa and their
weights are present (:mod:`training.iqa_noref`, never a download); otherwise they are reported
as not computed with the reason, never estimated.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from d3sr_core import host
from d3sr_core.atomic_file import write_text_atomic
from d3sr_core.image_io import IMAGE_EXTENSIONS, image_size, is_image_file, load_image_bchw

from . import iqa_noref, pretrained
from .dists import DISTS
from .lpips_alex import LPIPSAlex
from .niqe import BLOCK as NIQE_BLOCK
from .niqe import NIQE
from .pixel_metrics import SSIM_WINDOW, crop_border, psnr_y, ssim_y

__all__ = ["IMAGE_EXTENSIONS", "EvaluationResult", "evaluate_folders", "load_image", "main", "pair_files"]

load_image = load_image_bchw   # path -> (1, 3, H, W) float32 RGB (d3sr_core.image_io's ranges)
# AlexNet's two stride-2 max pools after its stride-4 first layer leave nothing below 31 px.
LPIPS_MIN_SIZE = 31
NOT_REQUESTED = "not requested; add --no-reference musiq,maniqa,clipiqa (needs pyiqa and the weights)"
# What the table and JSON say for the pyiqa metrics when --no-reference does not ask for them.
NOT_COMPUTED = {name.upper(): NOT_REQUESTED for name in iqa_noref.NOREF_METRICS}


@dataclass
class EvaluationResult:
    """Per-image rows ({'image', metric: value}) and the mean of each metric."""

    metrics: list[str]
    rows: list[dict] = field(default_factory=list)
    not_computed: dict[str, str] = field(default_factory=dict)

    @property
    def mean(self) -> dict[str, float]:
        return {m: float(np.mean([r[m] for r in self.rows])) for m in self.metrics}


def _images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    files = [p for p in sorted(folder.iterdir()) if is_image_file(p.name) and p.is_file()]
    by_stem: dict[str, list[Path]] = {}
    for p in files:
        by_stem.setdefault(p.stem, []).append(p)
    clashes = [" and ".join(p.name for p in group) for group in by_stem.values() if len(group) > 1]
    if clashes:
        raise ValueError(f"{folder} holds {len(clashes)} name(s) with more than one image, so pairs "
                         f"by name are ambiguous: {'; '.join(clashes[:3])}. Keep one file per name.")
    return {stem: group[0] for stem, group in by_stem.items()}


def pair_files(outputs: str | Path, gt: str | Path) -> list[tuple[Path, Path]]:
    """(output, ground truth) paths matched by file stem, sorted; every output needs a GT."""
    outs, gts = _images(Path(outputs)), _images(Path(gt))
    if not outs:
        raise FileNotFoundError(f"no images in {outputs}")
    missing = sorted(set(outs) - set(gts))
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) in {outputs} have no ground truth of the same "
                                f"name in {gt}, e.g. {missing[:3]}")
    return [(outs[k], gts[k]) for k in sorted(outs)]


def check_sizes(pairs: list[tuple[Path, Path]], crop: int, with_niqe: bool) -> None:
    """Raise ValueError, naming the image, for a pair whose sizes differ or are too small for a
    metric (read from the headers, so it fails before minutes of computation; an EXIF rotation
    is compared when the pixels are read)."""
    if crop < 0:
        raise ValueError(f"--crop-border must be 0 or more, got {crop}")
    for out_path, gt_path in pairs:
        (w, h), gt_size = image_size(out_path), image_size(gt_path)
        if sorted((w, h)) != sorted(gt_size):
            raise ValueError(f"{out_path.name}: output {w}x{h} vs ground truth {gt_size[0]}x{gt_size[1]}")
        cw, ch = w - 2 * crop, h - 2 * crop
        if min(cw, ch) < 1:
            raise ValueError(f"--crop-border {crop} leaves nothing of {out_path.name} ({w}x{h}); "
                             f"use a border below {(min(w, h) + 1) // 2}")
        if min(cw, ch) < SSIM_WINDOW:
            raise ValueError(f"{out_path.name} is {cw}x{ch} (after --crop-border {crop}), smaller than "
                             f"SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window; evaluate larger images")
        if min(w, h) < LPIPS_MIN_SIZE:
            raise ValueError(f"{out_path.name} is {w}x{h}; LPIPS (AlexNet) needs at least "
                             f"{LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} pixels; evaluate larger images")
        if with_niqe and (cw // NIQE_BLOCK) * (ch // NIQE_BLOCK) < 2:
            raise ValueError(f"{out_path.name} is {cw}x{ch} (after --crop-border {crop}); NIQE needs at "
                             f"least two {NIQE_BLOCK}x{NIQE_BLOCK} blocks; pass --no-niqe or evaluate "
                             "larger images")


def _niqe_or_reason() -> tuple[NIQE | None, str]:
    """(NIQE, "") or (None, why its pretrained statistics are unavailable)."""
    try:
        return NIQE(), ""
    except pretrained.WeightsUnavailable as err:
        return None, str(err).splitlines()[0]


def evaluate_folders(
    outputs: str | Path,
    gt: str | Path,
    crop: int = 0,
    device: str = "cpu",
    with_niqe: bool = True,
    limit: int | None = None,
    progress: bool = True,
    no_reference: Sequence[str] = (),
    iqa_weights: Mapping[str, Path] | None = None,
) -> EvaluationResult:
    """Compute every available metric for each (output, GT) pair; see the module doc.
    ``no_reference``: names from :data:`training.iqa_noref.NOREF_METRICS` to compute through
    pyiqa, with weight files from ``iqa_weights`` (name -> path) or pyiqa's cache.
    Raises ValueError (one line) for pairs that cannot be evaluated, before computing any."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    pairs = pair_files(outputs, gt)[:limit]
    metrics = ["psnr", "ssim", "lpips", "dists"]
    not_computed = dict(NOT_COMPUTED)
    niqe, reason = _niqe_or_reason() if with_niqe else (None, "disabled with --no-niqe")
    if niqe is None:
        not_computed["NIQE"] = reason
    else:
        metrics.append("niqe")
    check_sizes(pairs, crop, niqe is not None)
    dev = torch.device(device)
    noref, reasons = _no_reference_scorers(no_reference, iqa_weights or {}, dev)
    not_computed.update(reasons)
    for name in noref:
        del not_computed[name.upper()]
    metrics += list(noref)
    lpips = LPIPSAlex().to(dev).eval()
    dists = DISTS().to(dev).eval()
    result = EvaluationResult(metrics=metrics, not_computed=not_computed)
    for out_path, gt_path in tqdm(pairs, desc="evaluating", unit="img", disable=not progress, file=sys.stderr):
        out, ref = load_image(out_path).to(dev), load_image(gt_path).to(dev)
        if out.shape != ref.shape:  # headers agreed; EXIF orientation can still differ
            raise ValueError(f"{out_path.name}: output {tuple(out.shape[-2:])} vs ground truth {tuple(ref.shape[-2:])}")
        with torch.no_grad():
            out_c, ref_c = crop_border(out, crop), crop_border(ref, crop)
            row = {
                "image": out_path.name,
                "psnr": float(psnr_y(out_c, ref_c)),
                "ssim": float(ssim_y(out_c, ref_c)),
                "lpips": float(lpips(out, ref)),
                "dists": float(dists(out, ref)),
            }
            if niqe is not None:
                row["niqe"] = float(niqe(out_c.cpu()))
            for name, scorer in noref.items():
                row[name] = scorer(out)
        result.rows.append(row)
    return result


def _no_reference_scorers(no_reference: Sequence[str], iqa_weights: Mapping[str, Path],
                          dev: torch.device) -> tuple[dict[str, Callable], dict[str, str]]:
    """(name -> scorer, in NOREF_METRICS' order, for the asked metrics that can run;
    NAME -> why not, for those that cannot). Weights for a metric not asked for are an error."""
    unused = sorted(set(iqa_weights) - set(no_reference))
    if unused:
        raise ValueError(f"--iqa-weights names {', '.join(unused)}, which --no-reference does not ask for; "
                         "add it there or drop the weights")
    scorers, reasons = {}, {}
    for name in iqa_noref.NOREF_METRICS:
        if name in no_reference:
            scorer, reason = iqa_noref.build_metric(name, iqa_weights.get(name), dev)
            if scorer is None:
                reasons[name.upper()] = reason
            else:
                scorers[name] = scorer
    return scorers, reasons


def format_table(result: EvaluationResult, per_image: bool = True) -> str:
    """Plain-text table: one line per image (optional) and the mean."""
    names = ["image", *result.metrics]
    width = max([len("mean"), *(len(r["image"]) for r in result.rows)])
    lines = [f"{'image':<{width}}" + "".join(f"{m.upper():>10}" for m in result.metrics)]
    rows = result.rows if per_image else []
    for row in rows:
        lines.append(f"{row['image']:<{width}}" + "".join(f"{row[m]:>10.4f}" for m in names[1:]))
    mean = result.mean
    lines.append(f"{'mean':<{width}}" + "".join(f"{mean[m]:>10.4f}" for m in result.metrics))
    for name, why in result.not_computed.items():
        lines.append(f"{name}: not computed ({why})")
    return "\n".join(lines)


def to_csv(result: EvaluationResult) -> str:
    """CSV text: header, one row per image, then a 'mean' row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", *result.metrics])
    for row in result.rows:
        writer.writerow([row["image"], *(f"{row[m]:.6f}" for m in result.metrics)])
    writer.writerow(["mean", *(f"{v:.6f}" for v in result.mean.values())])
    return buffer.getvalue()


def to_json(result: EvaluationResult, outputs: str, gt: str, crop: int) -> str:
    """JSON text with settings, means, per-image values and the metrics not computed
    (non-finite values, e.g. a NaN NIQE of a featureless image, become null)."""
    def finite(value):
        return value if not isinstance(value, float) or math.isfinite(value) else None

    payload = {
        "outputs": str(outputs),
        "gt": str(gt),
        "crop_border": crop,
        "count": len(result.rows),
        "mean": {k: finite(v) for k, v in result.mean.items()},
        "per_image": [{k: finite(v) for k, v in row.items()} for row in result.rows],
        "not_computed": result.not_computed,
    }
    return json.dumps(payload, indent=2, allow_nan=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--outputs", required=True, help="folder of super-resolved images")
    parser.add_argument("--gt", required=True, help="folder of ground-truth images (same names)")
    parser.add_argument("--csv", help="write per-image and mean values here")
    parser.add_argument("--json", help="write settings, per-image and mean values here")
    parser.add_argument("--crop-border", type=int, default=0, help="pixels trimmed for PSNR/SSIM/NIQE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-niqe", action="store_true", help="skip NIQE (the slowest metric)")
    parser.add_argument("--limit", type=int, help="only the first N pairs (by name)")
    parser.add_argument("--no-reference", default="", metavar="LIST",
                        help="also compute these through pyiqa: musiq,maniqa,clipiqa (never downloads)")
    parser.add_argument("--iqa-weights", default="", metavar="NAME=FILE,...",
                        help="weight files for --no-reference metrics (default: pyiqa's cache)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, print only the mean")
    args = parser.parse_args(argv)
    try:
        for option, path in (("--csv", args.csv), ("--json", args.json)):
            if path and os.path.isdir(path):
                raise ValueError(f"{option} {path} is a folder; give a file name")
        no_reference = iqa_noref.parse_names(args.no_reference)
        iqa_weights = iqa_noref.parse_weights(args.iqa_weights)
        result = evaluate_folders(
            args.outputs, args.gt, args.crop_border, args.device, not args.no_niqe, args.limit, not args.quiet,
            no_reference, iqa_weights,
        )
    except (FileNotFoundError, ValueError, pretrained.WeightsUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result, per_image=not args.quiet))
    if any(math.isnan(v) for v in result.mean.values()):
        print("warning: some metric is NaN", file=sys.stderr)
    try:
        if args.csv:
            write_text_atomic(args.csv, to_csv(result))
        if args.json:
            write_text_atomic(args.json, to_json(result, args.outputs, args.gt, args.crop_border))
    except OSError as err:
        print(f"error: cannot write {err.filename or 'the results'}: {err.strerror or err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    host.run_main(main)
