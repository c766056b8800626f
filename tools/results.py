"""Writing results: a PNG with its parameters as text (a video: an mp4 with them in its comment tag), among them the
``command`` that makes it again; the ``--compare`` strip beside it; and the atomic write that every file of the
project goes through."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from tools import cli


def png_parameters(args: argparse.Namespace, steps_run: int, extra_params: dict | None = None) -> dict[str, str]:
    """The parameters a result is stored with, as PNG text, and ``args.command``, which makes it again."""
    def piped(path):  # a pipe's path (`--map <(...)`) names nothing once read: the text says so, not point at it
        return f"(a pipe: {path})" if isinstance(path, (str, Path)) and Path(path) in cli._piped else path
    source = {"mask": piped(args.mask), "feather": args.feather, "grow": args.grow} if args.mask else {
        "map": piped(args.map)}
    crop = {} if args.crop_margin is None else {"crop_margin": args.crop_margin, "crop_upscale": args.crop_upscale}
    speed = {name: getattr(args, name) for name in ("cache", "cache_threshold")
             if getattr(args, name, None) is not None}
    speed.update({"compile": True} if getattr(args, "compile", False) else {})
    def text(value) -> str:  # a list (a flag given once per item) as JSON, from run.py, batch and the app alike
        return json.dumps(value, ensure_ascii=False, default=str) if isinstance(value, (list, tuple)) else str(value)
    return {key: text(value) for key, value in {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "model": args.model, "image": piped(args.image),
        **source, "invert_map": args.invert_map, "strength": args.strength, "keep_exact": args.keep_exact,
        "steps": args.steps, "steps_run": steps_run, "guidance_scale": args.guidance_scale, "seed": args.seed,
        "scheduler": args.scheduler, "device": args.device, "dtype": args.dtype, **crop, **speed,
        **(extra_params or {}),
        "command": args.command, "Software": "differential-diffusion",  # the PNG keyword for the creating program
    }.items()}


def save_result(result: Image.Image, args: argparse.Namespace, *, image: Image.Image, map_image: Image.Image,
                steps_run: int, seconds: float, extra_params: dict | None = None) -> Path:
    """Writes the result with its parameters as PNG text (and the ``--compare`` strip); prints its path and time."""
    text = png_parameters(args, steps_run, extra_params)
    output = write_png(result, args.output, text, overwrite=args.overwrite)
    line = f"{cli.display(output)} ({seconds:.1f}s, {steps_run} denoising step{'' if steps_run == 1 else 's'})"
    if args.compare:
        strip = compare_strip(image, map_image, result, invert_map=args.invert_map)
        try:
            strip_path = write_png(strip, cli.compare_path(output), text, overwrite=args.overwrite)
        except cli.CliError as error:  # the output is there: a rerun without --overwrite would stop at it
            raise cli.CliError(f"wrote {cli.display(output)}, but not its comparison strip: {error}; rerun with "
                               "--overwrite once there is room (or without --compare)", error.exit_code) from error
        line += f"; comparison: {cli.display(strip_path)}"
    print(line)
    return output


def write_png(image: Image.Image, path: Path, text: dict[str, str] | None = None, *, overwrite: bool = False) -> Path:
    """Writes ``image`` as a PNG (``text``: its text chunks) with ``write_atomically``; returns the path written."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)  # falls back to an iTXt chunk for text latin-1 cannot hold
    return write_atomically(Path(path), lambda file: image.save(file, format="PNG", pnginfo=info), overwrite=overwrite)


def write_mp4(frames: list, path: Path, fps: float, text: dict[str, str] | None = None, *,
              overwrite: bool = False) -> Path:
    """Writes ``frames`` (PIL images) as an H.264 mp4 with diffusers' ``export_to_video``, ``text`` as JSON in its
    comment tag (``mp4_parameters`` reads it), with ``write_atomically``; returns the path written."""
    from diffusers.utils import export_to_video
    from imageio_ffmpeg import get_ffmpeg_exe

    def write(file):
        with tempfile.TemporaryDirectory() as folder:
            encoded, tagged = Path(folder, "encoded.mp4"), Path(folder, "tagged.mp4")
            export_to_video(frames, str(encoded), fps=fps)
            # export_to_video takes no metadata: the stream is copied, not encoded again, into a file that has it
            comment = json.dumps(text or {}, ensure_ascii=False)
            ffmpeg([get_ffmpeg_exe(), "-v", "error", "-i", str(encoded), "-map", "0", "-c", "copy", "-metadata",
                    f"comment={comment}", "-y", str(tagged)])
            file.write(tagged.read_bytes())
    return write_atomically(Path(path), write, overwrite=overwrite)


def mp4_parameters(path: Path) -> dict[str, str]:
    """The parameters ``write_mp4`` stored in an mp4's comment tag ({} where it has none)."""
    from imageio_ffmpeg import get_ffmpeg_exe

    metadata = ffmpeg([get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"])
    for line in metadata.splitlines():
        if line.startswith("comment="):  # ffmetadata escapes =, ;, #, \ and newlines with a backslash
            return json.loads(re.sub(r"\\(.)", r"\1", line[len("comment="):], flags=re.S))
    return {}


def ffmpeg(command: list[str]) -> str:
    """Runs imageio-ffmpeg's ffmpeg and returns its stdout; its failure is an OSError, as a failed write is."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"ffmpeg failed: {cli.one_line(done.stderr) or f'exit status {done.returncode}'}")
    return done.stdout


def write_atomically(path: Path, write: Callable, *, overwrite: bool = False) -> Path:
    """Calls ``write(file)`` on a temporary file, then renames it to ``path``: readers never see half a file. Without
    ``overwrite``, a ``path`` taken meanwhile is kept, and the first free ``<stem>-N`` name is used instead."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        _sweep(partial.parent)
        with open(partial, "wb") as file:
            write(file)
        target = path if overwrite or not path.exists() else cli.first_free(path)
        if target != path:
            cli.warn(f"{cli.display(path)} appeared during the run; wrote {cli.display(target)} instead")
        os.replace(partial, target)
        return target
    except OSError as error:
        raise cli.CliError(f"cannot write {cli.display(path)}: {cli.one_line(error)}", cli.EXIT_RUN_FAILED) from error
    finally:
        partial.unlink(missing_ok=True)


def compare_strip(image: Image.Image, map_image: Image.Image, result: Image.Image,
                  invert_map: bool = False) -> Image.Image:
    """input | map | output side by side at the output's height, each labelled as large as fits (at most 1/32)."""
    panels = [(image, "input"), (map_image, f"map (white = {'change' if invert_map else 'keep'})"), (result, "output")]
    panels = [(cli.as_rgb(panel).resize((max(1, round(panel.width * result.height / panel.height)), result.height),
                                    Image.Resampling.LANCZOS), label) for panel, label in panels]
    strip = Image.new("RGB", (sum(panel.width for panel, _ in panels), result.height))
    draw, left = ImageDraw.Draw(strip), 0
    for panel, label in panels:
        strip.paste(panel, (left, 0))
        for size in range(max(10, strip.height // 32), 7, -1):
            font = ImageFont.load_default(size=size)
            x0, y0, x1, y1 = draw.textbbox((left + 4, 4), label, font=font)
            if x1 + 3 < left + panel.width - 1 and y1 + 3 < strip.height - 1:
                draw.rectangle((x0 - 3, y0 - 3, x1 + 3, y1 + 3), fill=(0, 0, 0))  # readable on any picture
                draw.text((left + 4, 4), label, font=font, fill=(255, 255, 255))
                break
        left += panel.width
    return strip


_swept: set[str] = set()  # the folders this process has rid of stale partial files


def _sweep(folder: Path) -> None:
    """Removes the ``.NAME.PID.partial`` files of writes killed midway, whose process is gone: nothing else would.
    Once a folder and process, as a batch writes thousands of files into one."""
    if os.path.abspath(folder) in _swept:
        return
    _swept.add(os.path.abspath(folder))
    for partial in folder.glob(".*.partial"):
        pid = partial.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _running(int(pid)):
            with contextlib.suppress(OSError):  # not ours to remove after all: leave it
                partial.unlink()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or no process id at all: keep its file
        return True
    return True
