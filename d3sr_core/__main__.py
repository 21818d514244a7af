"""Command line: upscale a file or a folder with ComfyUI as a library (no server).

  python -m d3sr_core --checkpoint v2-1_512-ema-pruned.safetensors \
      --weights d3sr_x4.safetensors --input photos/ --output upscaled/ [--factor 4]

Outputs are PNGs named like the inputs (inputs that share a name, a.png and a.jpg, keep their
extension in it: a_png.png, a_jpg.png), written atomically; existing files are kept unless
--overwrite, and an output that would replace an input (the input folder itself, or a path
that resolves to an input) is refused. Images that cannot be read are skipped and listed at the
end (exit status 1); bad options stop before any model loads (exit status 2).
Set COMFYUI_PATH to use your own ComfyUI (default: the pinned host in .host/).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from .checks import check_factor, check_strength
from .image_io import IMAGE_EXTENSIONS, ImageReadError, is_image_file

EXIT_SOME_FAILED, EXIT_USAGE = 1, 2


class UsageError(Exception):
    """Options that cannot work; reported in one line before any model loads."""


def _checked(check: Callable[[float], float]) -> Callable[[str], float]:
    """An argparse type: a number that `check` accepts (its message otherwise)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m d3sr_core", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="SD2.1-base checkpoint file")
    p.add_argument("--weights", required=True, help="D3SR weight file (.safetensors)")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="output folder (not the input folder)")
    p.add_argument("--factor", type=_checked(check_factor), default=4.0,
                   help="upscale factor, 1..8 (default 4)")
    p.add_argument("--colour-fix", default="adain", choices=("adain", "wavelet", "none"))
    p.add_argument("--strength", type=_checked(check_strength), default=1.0,
                   help="LoRA strength (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    return p.parse_args(argv)


def list_inputs(path: str) -> list[str]:
    """The image files to process: `path` itself, or the images directly inside the folder."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if is_image_file(f) and os.path.isfile(os.path.join(path, f)))
        if files:
            return files
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
    raise UsageError(f"input {path} does not exist")


def output_names(inputs: list[str]) -> list[str]:
    """One PNG file name per input: `stem.png`, or `stem_ext.png` for inputs that share a stem.
    Names are compared ignoring case (as macOS and Windows file systems do); UsageError lists
    any clash that remains."""
    def key(name: str) -> str:
        return name.casefold()

    stems = [os.path.splitext(os.path.basename(p)) for p in inputs]
    count: dict[str, int] = {}
    for stem, _ext in stems:
        count[key(stem)] = count.get(key(stem), 0) + 1
    names = [f"{stem}_{ext.lstrip('.')}.png" if count[key(stem)] > 1 else f"{stem}.png"
             for stem, ext in stems]
    owners: dict[str, list[str]] = {}
    for path, name in zip(inputs, names):
        owners.setdefault(key(name), []).append(os.path.basename(path))
    clashes = [" and ".join(group) for group in owners.values() if len(group) > 1]
    if clashes:
        raise UsageError(f"{len(clashes)} output name(s) would be shared by several inputs "
                         f"({'; '.join(clashes[:5])}); rename those inputs")
    return names


def plan_outputs(inputs: list[str], output: str) -> list[tuple[str, str]]:
    """(input, output file) pairs; UsageError if the output is a file, is the folder an input
    comes from, or if an output path resolves to an input file (link, case-insensitive name)."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"output {output} is a file; give a folder")
    out_dir = os.path.realpath(output)
    if any(os.path.realpath(os.path.dirname(os.path.abspath(p))) == out_dir for p in inputs):
        raise UsageError(f"output folder {output} is the folder the input images are in; their upscales "
                         "would sit among (and could replace) the originals. Choose another folder.")
    input_files = {(s.st_dev, s.st_ino): p for p in inputs for s in [os.stat(p)]}
    plan = [(p, os.path.join(output, name)) for p, name in zip(inputs, output_names(inputs))]
    for _src, target in plan:
        if os.path.exists(target):
            st = os.stat(target)
            victim = input_files.get((st.st_dev, st.st_ino))
            if victim is not None:
                raise UsageError(f"output {target} is the input {victim} (a link or the same file); "
                                 "choose another output folder")
    return plan


def _check_writable(folder: str) -> None:
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {folder} cannot be written ({existing} is not writable)")


def _error(message: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)   # --factor and --strength are checked here (exit 2), before anything loads
    try:
        inputs = list_inputs(args.input)
        plan = plan_outputs(inputs, args.output)
        for f in (args.checkpoint, args.weights):
            if not os.path.isfile(f):
                raise UsageError(f"file not found: {f}")
        _check_writable(args.output)
    except UsageError as e:
        return _error(str(e))
    todo = [(src, dst) for src, dst in plan if args.overwrite or not os.path.exists(dst)]
    kept = len(plan) - len(todo)
    written, failed = 0, []
    if todo:
        from . import host
        host.import_comfy(cpu=True if args.cpu else None)
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

        import comfy.sd
        from tqdm import tqdm

        from .image_io import load_image, save_png_atomic
        from .model import load_d3sr
        from .pipeline import NonFiniteOutputError
        from .upscale import upscale

        try:
            model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_clip=False)
            d3sr = load_d3sr(model, vae, args.weights, args.strength)
        except (ValueError, RuntimeError, OSError) as e:   # the loaders' one-line messages
            return _error(str(e))
        for path, target in tqdm(todo, desc="D3SR", unit="image", disable=len(todo) == 1):
            try:
                image = load_image(path)
            except ImageReadError as e:
                failed.append(str(e))
                continue
            try:
                save_png_atomic(upscale(d3sr, image, args.factor, args.colour_fix), target)
            except NonFiniteOutputError as e:
                return _error(f"{path}: {e}")
            except OSError as e:
                return _error(f"cannot write {target}: {e.strerror or e}")
            written += 1
    print(f"wrote {written} image(s) to {os.path.abspath(args.output)}"
          + (f"; kept {kept} existing (use --overwrite)" if kept else "")
          + (f"; skipped {len(failed)} unreadable" if failed else ""))
    if failed:
        print(f"error: {len(failed)} image(s) could not be read and were skipped:", file=sys.stderr)
        for reason in failed:
            print(f"  {reason}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
