"""`python -m training.evaluate` on a subset of RealSR: values, files, messages."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import evaluate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "RealSR"
# Per-image values of the full-set run recorded in docs/evaluation.md (whose means match
# pyiqa's published OSEDiff numbers: 25.15 / 0.7341 / 0.2921 / 0.2128).
FULL_SET_VALUES = {
    "Canon_001_LR4.png": {"psnr": 25.79373, "ssim": 0.85127, "lpips": 0.22485, "dists": 0.18433},
    "Canon_002_LR4.png": {"psnr": 24.04586, "ssim": 0.73523, "lpips": 0.21426, "dists": 0.20242},
}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    if not DATA.is_dir():
        pytest.skip(f"test data not found at {DATA}")
    folder = tmp_path_factory.mktemp("eval")
    csv_path, json_path = folder / "out" / "metrics.csv", folder / "out" / "metrics.json"
    code = evaluate.main([
        "--outputs", str(DATA / "OSEDiff"), "--gt", str(DATA / "HR"), "--limit", "2", "--no-niqe",
        "--csv", str(csv_path), "--json", str(json_path), "--device", "cpu",
    ])
    return code, csv_path, json_path


def _y_numpy(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    return (16 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def _ssim_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Plain SSIM (Wang et al. 2004) on [0, 255] images, 11x11 Gaussian sigma 1.5, valid."""
    from scipy.signal import correlate2d  # here: 1.1 s to import, for this reference only
    ax = np.arange(11) - 5.0
    g = np.exp(-(ax**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()

    def f(x):
        return correlate2d(x, w, mode="valid")

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ma, mb = f(a), f(b)
    va, vb, cov = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
    cs = np.maximum((2 * cov + c2) / (va + vb + c2), 0)
    return float((((2 * ma * mb + c1) / (ma**2 + mb**2 + c1)) * cs).mean())


def test_cli_writes_csv_and_json(cli_run, capsys):
    code, csv_path, json_path = cli_run
    assert code == 0
    payload = json.loads(json_path.read_text())
    assert payload["count"] == 2 and [r["image"] for r in payload["per_image"]] == list(FULL_SET_VALUES)
    for metric in ("psnr", "ssim", "lpips", "dists"):
        mean = np.mean([r[metric] for r in payload["per_image"]])
        assert payload["mean"][metric] == pytest.approx(mean, abs=1e-12)
    assert set(payload["not_computed"]) >= {"MUSIQ", "MANIQA", "CLIPIQA"}
    rows = list(csv.reader(csv_path.read_text().splitlines()))
    assert rows[0] == ["image", "psnr", "ssim", "lpips", "dists"]
    assert rows[-1][0] == "mean" and float(rows[-1][1]) == pytest.approx(payload["mean"]["psnr"], abs=1e-5)
    assert not list(csv_path.parent.glob(".*.tmp"))  # atomic writes leave no temp files


def test_subset_matches_full_set_values(cli_run):
    _, _, json_path = cli_run
    for row in json.loads(json_path.read_text())["per_image"]:
        for metric, value in FULL_SET_VALUES[row["image"]].items():
            assert row[metric] == pytest.approx(value, abs=1e-4), (row["image"], metric)


def test_psnr_and_ssim_match_independent_numpy(cli_run):
    _, _, json_path = cli_run
    for row in json.loads(json_path.read_text())["per_image"]:
        out, ref = _y_numpy(DATA / "OSEDiff" / row["image"]), _y_numpy(DATA / "HR" / row["image"])
        psnr = 10 * np.log10(1.0 / np.mean((out - ref) ** 2))
        assert row["psnr"] == pytest.approx(psnr, abs=1e-4)
        ssim = _ssim_numpy(np.round(out * 255), np.round(ref * 255))
        assert row["ssim"] == pytest.approx(ssim, abs=1e-6)


def test_table_names_the_metrics_that_cannot_run_offline(tmp_path):
    result = evaluate.EvaluationResult(metrics=["psnr"], rows=[{"image": "a.png", "psnr": 20.0}])
    result.not_computed = dict(evaluate.NOT_COMPUTED)
    table = evaluate.format_table(result)
    assert "mean" in table and "20.0000" in table
    for name in ("MUSIQ", "MANIQA", "CLIPIQA"):
        assert f"{name}: not computed" in table


def test_missing_ground_truth_is_an_error(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "gt").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "out" / "x.png")
    code = evaluate.main(["--outputs", str(tmp_path / "out"), "--gt", str(tmp_path / "gt"), "--quiet"])
    assert code == 2
    assert "no ground truth" in capsys.readouterr().err


def test_matlab_half_resize_keeps_constants_and_averages_ramps():
    from training.niqe import matlab_imresize_half

    constant = torch.full((20, 24), 7.0, dtype=torch.float64)
    torch.testing.assert_close(matlab_imresize_half(constant), torch.full((10, 12), 7.0, dtype=torch.float64))
    ramp = torch.arange(24, dtype=torch.float64).repeat(20, 1)
    half = matlab_imresize_half(ramp)
    # away from the mirrored borders, output column j sits between inputs 2j and 2j+1
    torch.testing.assert_close(half[:, 3:9], (2 * torch.arange(3, 9, dtype=torch.float64) + 0.5).repeat(10, 1))


def test_niqe_prefers_the_sharp_image():
    from training.niqe import NIQE

    if not DATA.is_dir():
        pytest.skip(f"test data not found at {DATA}")
    image = evaluate.load_image(DATA / "HR" / "Canon_001_LR4.png")[..., :288, :288]
    blurred = torch.nn.functional.avg_pool2d(image, 4)
    blurred = torch.nn.functional.interpolate(blurred, scale_factor=4, mode="bilinear")
    scores = NIQE()(torch.cat([image, blurred]))
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert 2.0 < scores[0].item() < 15.0
    assert scores[1].item() > scores[0].item() + 1.0


# ---- 16-bit files and careless input -------------------------------------------------------

def _evaluate_json(tmp_path: Path, outputs: Path, gt: Path) -> dict:
    json_path = tmp_path / "m.json"
    code = evaluate.main(["--outputs", str(outputs), "--gt", str(gt), "--no-niqe", "--quiet",
                          "--device", "cpu", "--json", str(json_path)])
    assert code == 0
    return json.loads(json_path.read_text())["per_image"][0]


def test_16bit_images_are_read_with_their_range(tmp_path):
    from image_files import write_png16

    rng = np.random.default_rng(5)
    for name in ("same", "grey", "low"):
        (tmp_path / name / "out").mkdir(parents=True)
        (tmp_path / name / "gt").mkdir()
    rgb16 = rng.integers(0, 65536, size=(40, 36, 3)).astype(np.uint16)
    # An identical 16-bit pair: PSNR at its cap 10 log10(1 / 1e-8) = 80 dB, SSIM 1.
    write_png16(tmp_path / "same" / "out" / "a.png", rgb16)
    write_png16(tmp_path / "same" / "gt" / "a.png", rgb16)
    row = _evaluate_json(tmp_path, tmp_path / "same" / "out", tmp_path / "same" / "gt")
    assert row["psnr"] == pytest.approx(80.0, abs=1e-9) and row["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert row["lpips"] == pytest.approx(0.0, abs=1e-6)
    # A 16-bit grey output equal to its 8-bit ground truth (v16 = 257 v8): the same image.
    grey8 = rng.integers(0, 256, size=(40, 36)).astype(np.uint8)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "grey" / "out" / "a.png")
    Image.fromarray(grey8).save(tmp_path / "grey" / "gt" / "a.png")
    row = _evaluate_json(tmp_path, tmp_path / "grey" / "out", tmp_path / "grey" / "gt")
    assert row["psnr"] == pytest.approx(80.0, abs=1e-6)
    # Pairs that differ only in the low byte: PSNR from all 16 bits (numpy, float64).
    other = (rgb16 & 0xFF00) | rng.integers(0, 256, size=rgb16.shape).astype(np.uint16)
    write_png16(tmp_path / "low" / "out" / "a.png", rgb16)
    write_png16(tmp_path / "low" / "gt" / "a.png", other)
    row = _evaluate_json(tmp_path, tmp_path / "low" / "out", tmp_path / "low" / "gt")
    weights = np.array([65.481, 128.553, 24.966]) / 255.0
    y_out, y_gt = (rgb16.astype(np.float32) / np.float32(65535)).astype(np.float64) @ weights, \
        (other.astype(np.float32) / np.float32(65535)).astype(np.float64) @ weights
    assert row["psnr"] == pytest.approx(10 * np.log10(1 / (np.mean((y_out - y_gt) ** 2) + 1e-8)), abs=1e-6)
    assert 50.0 < row["psnr"] < 79.0


def _careless(tmp_path: Path, case: str) -> list[str]:
    """Folders (and arguments) for one careless-input case."""
    out, gt = tmp_path / "out", tmp_path / "gt"
    out.mkdir()
    gt.mkdir()
    size = {"tiny": 10, "lpips": 20}.get(case, 40)
    rng = np.random.default_rng(0)
    for folder in (out, gt):
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3)).astype(np.uint8)).save(folder / "a.png")
    args = ["--outputs", str(out), "--gt", str(gt), "--no-niqe", "--quiet", "--device", "cpu"]
    if case == "corrupt":
        (out / "a.png").write_bytes(b"this is not a png")
    elif case == "truncated":
        Image.fromarray(rng.integers(0, 256, size=(64, 64, 3)).astype(np.uint8)).save(out / "a.png")
        Image.fromarray(rng.integers(0, 256, size=(64, 64, 3)).astype(np.uint8)).save(gt / "a.png")
        data = (out / "a.png").read_bytes()
        (out / "a.png").write_bytes(data[: len(data) // 2])
    elif case == "crop":
        args += ["--crop-border", "25"]
    elif case == "negative_crop":
        args += ["--crop-border", "-1"]
    elif case == "csv_folder":
        (tmp_path / "metrics.csv").mkdir()
        args += ["--csv", str(tmp_path / "metrics.csv")]
    elif case in ("limit0", "limit_negative"):
        args += ["--limit", "0" if case == "limit0" else "-3"]
    elif case == "two_files_one_name":
        Image.new("RGB", (40, 40)).save(gt / "a.jpg")
    elif case == "niqe_too_small":
        args.remove("--no-niqe")
    return args


@pytest.mark.parametrize("case, expected", [
    ("corrupt", r"cannot read image .*a\.png"),
    ("truncated", r"cannot read image .*a\.png"),
    ("tiny", r"a\.png is 10x10 .*SSIM's 11x11 window"),
    ("lpips", r"a\.png is 20x20; LPIPS \(AlexNet\) needs at least 31x31"),
    ("crop", r"--crop-border 25 leaves nothing of a\.png \(40x40\)"),
    ("negative_crop", r"--crop-border must be 0 or more"),
    ("csv_folder", r"--csv .*metrics\.csv is a folder"),
    ("limit0", r"--limit must be at least 1, got 0"),
    ("limit_negative", r"--limit must be at least 1, got -3"),
    ("two_files_one_name", r"a\.jpg and a\.png"),
    ("niqe_too_small", r"NIQE needs at least two 96x96 blocks; pass --no-niqe"),
])
def test_careless_input_gives_one_line_errors(tmp_path, capsys, case, expected):
    if case == "niqe_too_small" and evaluate._niqe_or_reason()[0] is None:
        pytest.skip("NIQE's parameters are not available here")
    code = evaluate.main(_careless(tmp_path, case))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(expected, err[0]), err[0]
