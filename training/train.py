"""D3SR adversarial training, the command line:

    python -m training.train --config CONFIG [--resume [CKPT]] [--steps N] [--output-dir DIR]
    torchrun --nproc_per_node N -m training.train --config CONFIG

One iteration = one discriminator step, then one generator step (training.trainer); the run
around it (checks, lock, resume, data, checkpoints, signals) is training.loop. A config, model,
data, output-folder or checkpoint problem exits with code 2 and one `error:` line, before any
model is loaded; a stop signal before the first step exits at once (code 128 + signal number).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from d3sr_core import host

from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .data import DataError
from .distributed import select_device
from .model_files import ModelFileError
from .stop import StopSignal

log = logging.getLogger("d3sr.train")
USER_ERRORS = (ConfigError, DataError, ModelFileError, CheckpointError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (training/configs/*.yaml)")
    parser.add_argument("--make-tiny-setup", metavar="DIR",
                        help="write the generated models and images tiny_cpu.yaml uses into DIR, then exit")
    parser.add_argument("--resume", nargs="?", const=True, default=None,
                        help="continue from the newest intact checkpoint in output_dir (or the one given)")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--steps", type=int, help="override train.steps (>= 1)")
    return parser


def _make_tiny_setup(folder: str) -> int:
    # Development scaffolding (generated models): imported only for this option.
    from devtools.tiny_setup import prepare_tiny_setup
    print(json.dumps(prepare_tiny_setup(folder), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.make_tiny_setup:
        return _make_tiny_setup(args.make_tiny_setup)
    if not args.config:
        parser.error("--config is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = StopSignal()  # Ctrl-C / SIGTERM while ComfyUI and the models load: stop at once
    try:
        return _run(args, stop)
    except BaseException as e:
        # A stop signal first: a library may have turned it into any error, a user error too.
        stopped = stop.stop_request(e)
        if stopped is not None:
            print(f"error: {stopped}", file=sys.stderr)
            return 128 + stopped.signum
        if not isinstance(e, USER_ERRORS):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        stop.restore()


def _run(args: argparse.Namespace, stop: StopSignal) -> int:
    overrides: dict = {}
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    if args.steps is not None:
        overrides["train"] = {"steps": args.steps}
    cfg = load_config(args.config, overrides)
    device = select_device(cfg)
    host.import_comfy(cpu=device.type == "cpu")
    # ComfyUI reads its device options when comfy.model_management is first imported, which
    # the trainer's modules do at import: so they are imported once the device is known.
    from .loop import train
    torch.manual_seed(cfg.seed)
    return train(cfg, args.resume, stop)


if __name__ == "__main__":
    host.run_main(main)
