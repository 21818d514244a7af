"""`make demo`: start a headless ComfyUI with this pack, run the example workflow on an example
image over the HTTP API, and say where the upscaled PNG is.

Real models are used when the host has them: checkpoints/v2-1_512-ema-pruned.safetensors (or
$D3SR_DEMO_CHECKPOINT) and a file in models/d3sr/ (or $D3SR_DEMO_WEIGHTS). Otherwise a tiny
random demo model is generated, and the output is NOT a meaningful image.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))
sys.path.append(str(ROOT / "scripts"))

from comfy_server import ComfyServer  # noqa: E402

from d3sr_core import host  # noqa: E402
from d3sr_core.atomic_file import atomic_path  # noqa: E402

OUT = ROOT / "out" / "demo"
SHARED_LR = ROOT.parent / "shared" / "data" / "RealSR" / "LR"


def real_models(comfy_root: Path) -> tuple[Path, str, str] | None:
    """(models dir, checkpoint name, weights name) when the host has real files, else None."""
    models = comfy_root / "models"
    ckpt = os.environ.get("D3SR_DEMO_CHECKPOINT", "v2-1_512-ema-pruned.safetensors")
    weights = os.environ.get("D3SR_DEMO_WEIGHTS")
    if weights is None and (models / "d3sr").is_dir():
        found = sorted(p.name for p in (models / "d3sr").iterdir() if p.suffix == ".safetensors")
        weights = found[0] if found else None
    if weights and (models / "checkpoints" / ckpt).is_file() and (models / "d3sr" / weights).is_file():
        return models, ckpt, weights
    return None


def example_image(dest: Path) -> None:
    """A real low-resolution photo from shared/data when present, else a synthetic pattern."""
    photos = sorted(SHARED_LR.glob("*.png")) if SHARED_LR.is_dir() else []
    if photos:
        shutil.copy(photos[0], dest)
        return
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:128, 0:128] / 128.0
    img = np.stack([0.5 + 0.5 * np.sin(12 * x * y * np.pi), x, 1 - y], -1)
    Image.fromarray((img * 255).astype(np.uint8)).save(dest)


def main() -> int:
    comfy_root = Path(host.find_comfyui())
    found = real_models(comfy_root)
    if found:
        models, ckpt, weights = found
        print(f"[demo] using real models: {ckpt} + {weights}")
    else:
        host.import_comfy(cpu=True)
        from devtools import synthetic
        models = OUT / "models"
        for sub in ("checkpoints", "d3sr"):
            (models / sub).mkdir(parents=True, exist_ok=True)
        ckpt, weights = synthetic.write_demo_files(str(models))
        print("\n" + "!" * 78)
        print("[demo] No SD2.1-base checkpoint + D3SR weights in the host's models folder:")
        print("[demo] using a TINY RANDOM demo model. The output is NOT a meaningful image;")
        print("[demo] it only shows the pipeline running end to end. See README: 'Which files go where'.")
        print("!" * 78 + "\n")
    work = OUT / "server"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    server = ComfyServer(str(comfy_root), ROOT, models, work)
    example_image(server.input_dir / "d3sr_example_lr.png")
    graph = json.loads((ROOT / "workflows" / "api" / "d3sr_upscale_x4.json").read_text())
    graph["1"]["inputs"]["ckpt_name"] = ckpt
    graph["2"]["inputs"]["weights"] = weights
    print(f"[demo] starting ComfyUI ({comfy_root}) on {server.url} ...")
    server.start()
    try:
        entry = server.run_prompt(graph)
    finally:
        server.stop()
    if entry["status"]["status_str"] != "success":
        print(json.dumps(entry["status"], indent=2)[:4000])
        print(f"[demo] FAILED; server log: {server.log_path}")
        return 1
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    final = OUT / "d3sr_demo_x4.png"
    with atomic_path(final) as tmp:
        shutil.copyfile(server.output_dir / images[0]["subfolder"] / images[0]["filename"], tmp)
    print(f"[demo] upscaled image written to {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
