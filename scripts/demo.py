"""`make demo`: start a headless ComfyUI with this pack, run the example workflow on an example
image over the HTTP API, and say where the upscaled PNG is.

`python scripts/demo.py --browser [--port 8188]` then keeps the same server running with the
web page (comfyui-frontend-package, which `make setup` installs) at http://127.0.0.1:8188
until Ctrl-C, to look at the templates and the result in a browser.

Real models are used when the host has them: checkpoints/v2-1_512-ema-pruned.safetensors (or
$D3SR_DEMO_CHECKPOINT) and a file in models/d3sr/ (or $D3SR_DEMO_WEIGHTS). Otherwise a tiny
random demo model is generated, and the output is NOT a meaningful image.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
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
    """A real low-resolution photo from shared/data when present; otherwise the pack copies its
    own example image (workflows/d3sr_example_lr.png) into the input folder when it loads."""
    photos = sorted(SHARED_LR.glob("*.png")) if SHARED_LR.is_dir() else []
    if photos:
        shutil.copy(photos[0], dest)


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the D3SR example workflow in a headless ComfyUI.")
    parser.add_argument("--browser", action="store_true",
                        help="afterwards keep the server running with the web page until Ctrl-C")
    parser.add_argument("--port", type=int, default=8188, help="port for --browser (default 8188)")
    args = parser.parse_args()
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
    server = ComfyServer(str(comfy_root), ROOT, models, work, frontend=args.browser,
                         port=args.port if args.browser else None)
    example_image(server.input_dir / "d3sr_example_lr.png")
    graph = json.loads((ROOT / "workflows" / "api" / "D3SR Upscale x4.json").read_text())
    graph["1"]["inputs"]["ckpt_name"] = ckpt
    graph["2"]["inputs"]["weights"] = weights
    print(f"[demo] starting ComfyUI ({comfy_root}) on {server.url} ...")
    server.start()
    try:
        entry = server.run_prompt(graph)
        if entry["status"]["status_str"] != "success":
            print(json.dumps(entry["status"], indent=2)[:4000])
            print(f"[demo] FAILED; server log: {server.log_path}")
            return 1
        images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
        final = OUT / "d3sr_demo_x4.png"
        with atomic_path(final) as tmp:
            shutil.copyfile(server.output_dir / images[0]["subfolder"] / images[0]["filename"], tmp)
        print(f"[demo] upscaled image written to {final}")
        if args.browser:
            print(f"[demo] open {server.url} in a browser (Workflow > Browse Templates shows the pack's "
                  "templates); Ctrl-C stops the server")
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the server too
            try:
                while server.proc.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
