"""Strength Fan and strength sweep: what every strength does to one image, with any model of this project.

    python -m tools.fan --family sd2 fan --image photo.jpg --prompt "a watercolour painting" --sectors 8
    python -m tools.fan --family sd2 sweep --image photo.jpg --prompt "a watercolour painting" --scheduler ddim
    python path/to/tools/fan.py --family sd2 fan ...       # the same, from any folder

``--family`` names a model folder of this repository (``sd2`` is ``SD2/``, ``sdxl`` is ``SDXL/``...), and every flag
after the mode is that model's own ``run.py`` flag (``--model``, ``--steps``, ``--seed``, ``--keep-exact``...): the
tool imports the folder's ``run.py`` by path and uses its ``build_parser``, ``load_pipelines`` and ``edit``, so it
works with every model that has a ``run.py``.

fan
    ONE edit whose map turns strength by angle around the image centre: ``--sectors N`` equal sectors, clockwise
    from 12 o'clock, from strength 0 to 1 (``tools.maps.strength_fan``). Writes the raw output (default ``fan.png``)
    and a copy with each sector's strength written on it (``fan-labelled.png``).
sweep
    The same seed at strengths 0, 0.1, ..., 1 (``--strengths``) under uniform maps, as ONE batched call: a batch of
    identical images, one uniform map per item and one generator per item, all seeded with ``--seed``. Writes a
    labelled grid (default ``sweep.png``). A strength of 0 gives back the original (the input itself with
    ``--keep-exact``).

Schedulers. A sweep item of strength s, and a fan sector of strength s, equal stock img2img at ``strength=s`` (bit for
bit against stock run on a batch of the same size on the CPU) only with schedulers whose step depends on nothing but
the current latents and timestep: DDIM (``--scheduler ddim``) and Euler (``--scheduler euler``). Every item runs from
the first step of the strongest one, and frozen items take the noised original at each step; multistep solvers
(DPM-Solver++, UniPC, PNDM) keep a history of model outputs that then includes the frozen steps, and stochastic ones
(Euler ancestral, DDPM) draw fresh noise at steps where stock would not have started yet. Their results still
follow the strengths, but differ a little from stock img2img; the tool warns when it sees such a scheduler.

Nothing is overwritten: an existing output (or its labelled copy, or ``--compare`` strip) is refused unless
``--overwrite``, and without ``--output`` the files go to the first free ``fan.png``, ``fan-1.png``...
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if __package__ in (None, ""):  # started as a script path (python tools/fan.py): make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import cli, loading, results  # noqa: E402
from tools.maps import MAX_FAN_SECTORS, fan_sector_bounds, fan_strengths, strength_fan  # noqa: E402

MODES = ("fan", "sweep")
DEFAULT_SWEEP = tuple(round(k / 10, 1) for k in range(11))
MAX_SWEEP_ITEMS = 64
GRID_GAP = 4  # pixels between the tiles of a sweep grid
# Schedulers whose step reads only the current latents and timestep; see the module docstring.
STATELESS_SCHEDULERS = {"DDIMScheduler", "EulerDiscreteScheduler"}

USAGE = "python -m tools.fan --family FAMILY {fan,sweep} [flags of FAMILY/run.py] [--sectors N | --strengths LIST]"


# ---------------------------------------------------------------------------------------------------------------
# Arguments


def split_command_line(argv: list[str]) -> tuple[str | None, str | None, list[str]]:
    """``--family F MODE rest...`` -> ``(F, MODE, rest)``; the rest belongs to the family's run.py parser.

    ``--family`` may also come after the mode. The mode is the first word that is not a flag or a flag's value.
    """
    family = mode = None
    rest = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--family":
            if index + 1 >= len(argv):
                raise cli.CliError("--family needs a value, such as --family sd2")
            family, index = argv[index + 1], index + 2
            continue
        if token.startswith("--family="):
            family = token.partition("=")[2]
        elif mode is None and not token.startswith("-"):
            mode = token
        elif mode is None:
            rest = argv[index:]  # a flag before the mode: the caller decides whether it is --help
            break
        else:
            rest.append(token)
        index += 1
    return family, mode, rest


def build_parser(family, family_name: str, mode: str) -> argparse.ArgumentParser:
    """The family's run.py parser, with this tool's name and its fan or sweep flags added."""
    parser = family.build_parser()
    parser.prog = f"python -m tools.fan --family {family_name} {mode}"
    note = (
        "\n\nSchedulers: items and sectors equal stock img2img at their strength with --scheduler ddim or euler, where"
        "\nthe family takes them (the flow-matching families take only their own); multistep (dpm++, unipc, pndm) and"
        "\nstochastic (euler-a, ddpm) ones differ a little (see docs/tools.md)."
    )
    if mode == "fan":
        parser.description = (
            "Strength Fan: one edit whose strength grows by angle around the image centre, from 0 to 1 in equal "
            "sectors clockwise from 12 o'clock. Writes the output and a labelled copy. --map, --mask, --invert-map "
            "and --strength do not apply: the fan sets every pixel's strength."
        )
        group = parser.add_argument_group("strength fan")
        group.add_argument(
            "--sectors", type=cli.whole_number(2, MAX_FAN_SECTORS), default=8, metavar="N",
            help=f"number of sectors, 2 to {MAX_FAN_SECTORS}; sector k has strength k/(N-1), rounded to two "
            "decimals as labelled (default: 8)",
        )
    else:
        parser.description = (
            "Strength sweep: the same seed at several strengths, each under a uniform map, in one batched call, "
            "assembled into a labelled grid. --map, --mask, --invert-map, --strength and --compare do not apply."
        )
        group = parser.add_argument_group("strength sweep")
        group.add_argument(
            "--strengths", type=_strength_list, default=DEFAULT_SWEEP, metavar="LIST",
            help=f"comma-separated strengths from 0 to 1, at most {MAX_SWEEP_ITEMS}; each is one item of the batch "
            "(default: 0,0.1,...,1)",
        )
        group.add_argument(
            "--columns", type=cli.whole_number(1, MAX_SWEEP_ITEMS), metavar="N",
            help="tiles per row of the grid (default: the square root of the number of strengths, rounded up)",
        )
    parser.epilog = (parser.epilog or "") + note
    parser.default_output = Path(f"{mode}.png")
    if mode == "fan":  # checked like --output, and the default name is the first free for both
        parser.extra_outputs = lambda args, output: [labelled_path(output)]
    return parser


def _strength_list(text: str) -> tuple[float, ...]:
    parse = cli.real_number(0, 1)
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not 1 <= len(items) <= MAX_SWEEP_ITEMS:
        raise argparse.ArgumentTypeError(f"must list 1 to {MAX_SWEEP_ITEMS} strengths, got {text!r}")
    return tuple(parse(item) for item in items)


def parse_args(argv: list[str] | None = None):
    """Returns ``(family module, mode, args)``; every check that needs no model is done."""
    argv = sys.argv[1:] if argv is None else list(argv)
    family_name, mode, rest = split_command_line(argv)
    if family_name is None or mode is None:
        if any(token in ("-h", "--help") for token in argv[:1] + rest[:1]):
            print(__doc__)
            raise SystemExit(0)
        raise cli.CliError(f"usage: {USAGE}")
    if mode not in MODES:
        raise cli.CliError(f"unknown mode {mode!r}: choose fan or sweep ({USAGE})")
    family = loading.image_family(family_name, "tools.fan")
    parser = build_parser(family, family_name.lower(), mode)
    _refuse_map_flags(parser.parse_args(rest), mode)  # only to see which flags were given
    return family, mode, cli.parse_args(parser, rest, command=shlex.join(["python", "-m", "tools.fan", *argv]))


def _refuse_map_flags(raw: argparse.Namespace, mode: str) -> None:
    what = "the fan sets every pixel's strength itself" if mode == "fan" else "each sweep item has a uniform map"
    for flag, given in (("--map", raw.map is not None), ("--mask", raw.mask is not None),
                        ("--invert-map", raw.invert_map), ("--strength", raw.strength != 1.0)):
        if given:
            raise cli.CliError(f"{flag} does not apply to {mode}: {what}; drop {flag}")
    if mode == "sweep" and raw.compare:
        raise cli.CliError("--compare does not apply to sweep: the grid already shows every strength; drop --compare")


def labelled_path(output: Path) -> Path:
    """Where the fan's labelled copy of ``output`` goes: ``<stem>-labelled.png`` next to it."""
    return output.with_name(f"{output.stem}-labelled{output.suffix}")


# ---------------------------------------------------------------------------------------------------------------
# Edits


def uniform_map(size: tuple[int, int], strength: float) -> Image.Image:
    """A keep map (mode F, white = keep) of ``size`` (width, height) with the same ``strength`` everywhere."""
    return Image.fromarray(np.full((size[1], size[0]), 1.0 - strength, dtype=np.float32))


def fan_edit(family, pipelines, args, image: Image.Image, sectors: int):
    """One edit of ``image`` under the Strength Fan map; returns ``(output, fan map, steps run)``."""
    fan_map = Image.fromarray(strength_fan(image.width, image.height, sectors))
    (output,), steps_run = family.edit(
        pipelines, args, images=[image], maps=[fan_map], prompts=[args.prompt],
        negative_prompts=[args.negative_prompt], seeds=[args.seed],
    )
    return output, fan_map, steps_run


def sweep_edit(family, pipelines, args, image: Image.Image, strengths) -> tuple[list[Image.Image], int]:
    """``image`` at each of ``strengths``, in one batched call with the same seed for every item."""
    count = len(strengths)
    return family.edit(
        pipelines, args, images=[image] * count, maps=[uniform_map(image.size, s) for s in strengths],
        prompts=[args.prompt] * count, negative_prompts=[args.negative_prompt] * count, seeds=[args.seed] * count,
    )


def stateful_schedulers(pipelines) -> list[str]:
    """Class names of the schedulers in ``pipelines`` (a pipeline, or a tuple, list or dict of them) whose steps
    are not stateless (see the module docstring)."""
    if isinstance(pipelines, dict):
        pipelines = list(pipelines.values())
    elif not isinstance(pipelines, (list, tuple)):
        pipelines = [pipelines]
    names = {type(pipe.scheduler).__name__ for pipe in pipelines if getattr(pipe, "scheduler", None) is not None}
    return sorted(names - STATELESS_SCHEDULERS)


def scheduler_warning(name: str) -> str:
    """What a fan or sweep says of a scheduler that ``stateful_schedulers`` names: a flow-matching family refuses
    --scheduler ddim and euler, so it is not told to pass them."""
    if name.startswith("FlowMatch"):
        return (f"{name} is this family's own flow-matching sampler, the only one it takes; equality with stock "
                "img2img at each strength is shown for DDIM and Euler only, so each strength may differ a little")
    return (f"{name} is not stateless from step to step (it keeps a history of steps, or draws fresh noise), so each "
            "strength differs a little from stock img2img at that strength; --scheduler ddim or euler match it exactly")


# ---------------------------------------------------------------------------------------------------------------
# Pictures


def _font(height: int):
    return ImageFont.load_default(size=max(10, height))


def draw_label(image: Image.Image, text: str, xy: tuple[float, float], anchor: str, size: int) -> None:
    """White text on a black box at ``xy`` (PIL text anchor ``anchor``): readable on any picture."""
    draw = ImageDraw.Draw(image)
    font = _font(size)
    x0, y0, x1, y1 = draw.textbbox(xy, text, font=font, anchor=anchor)
    pad = max(2, size // 5)
    draw.rectangle((x0 - pad, y0 - pad, x1 + pad, y1 + pad), fill=(0, 0, 0))
    draw.text(xy, text, font=font, fill=(255, 255, 255), anchor=anchor)


def label_fan(output: Image.Image, sectors: int) -> Image.Image:
    """A copy of a fan edit with the sector borders drawn and each sector's strength written in it."""
    labelled = output.convert("RGB")
    width, height = labelled.size
    centre = ((width - 1) / 2, (height - 1) / 2)
    reach = math.hypot(width, height)
    draw = ImageDraw.Draw(labelled)
    line = max(1, min(width, height) // 256)
    for start, _ in fan_sector_bounds(sectors):
        end = _point_at(centre, start, reach)
        draw.line([centre, end], fill=(0, 0, 0), width=line + 2)
        draw.line([centre, end], fill=(255, 255, 255), width=line)
    radius = 0.36 * min(width, height)
    size = max(10, min(width, height) // 24)
    for (start, end), strength in zip(fan_sector_bounds(sectors), fan_strengths(sectors)):
        draw_label(labelled, f"{strength:.2f}", _point_at(centre, (start + end) / 2, radius), "mm", size)
    return labelled


def _point_at(centre: tuple[float, float], clockwise_degrees: float, radius: float) -> tuple[float, float]:
    theta = math.radians(clockwise_degrees)
    return centre[0] + radius * math.sin(theta), centre[1] - radius * math.cos(theta)


def sweep_grid(images: list[Image.Image], strengths, columns: int | None = None) -> Image.Image:
    """The sweep's images as a grid, row by row, each labelled with its strength."""
    if columns is None:
        columns = math.ceil(math.sqrt(len(images)))
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width + (columns - 1) * GRID_GAP, rows * height + (rows - 1) * GRID_GAP),
                     (32, 32, 32))
    size = max(10, min(width, height) // 16)
    for index, (image, strength) in enumerate(zip(images, strengths)):
        left, top = (index % columns) * (width + GRID_GAP), (index // columns) * (height + GRID_GAP)
        grid.paste(image.convert("RGB").resize((width, height)), (left, top))
        draw_label(grid, f"strength {strength:g}", (left + size // 2, top + size // 2), "la", size)
    return grid


# ---------------------------------------------------------------------------------------------------------------
# Command line


def run(argv: list[str] | None = None) -> None:
    family, mode, args = parse_args(argv)
    image, _ = cli.load_inputs(args)
    pipelines = family.load_pipelines(args)
    for name in stateful_schedulers(pipelines):
        cli.warn(scheduler_warning(name))
    started = time.perf_counter()
    if mode == "fan":
        output, fan_map, steps_run = fan_edit(family, pipelines, args, image, args.sectors)
        extra = {"tool": "fan", "map": f"strength fan, {args.sectors} sectors", "sectors": args.sectors}
        written = _write(output, args, steps_run, extra, args.output)
        labelled = _write(label_fan(output, args.sectors), args, steps_run, extra, labelled_path(written))
        line = f"; labelled: {cli.display(labelled)}"
        if args.compare:
            strip = results.compare_strip(image, fan_map, output)
            line += f"; comparison: {cli.display(_write(strip, args, steps_run, extra, cli.compare_path(written)))}"
    else:
        outputs, steps_run = sweep_edit(family, pipelines, args, image, args.strengths)
        extra = {"tool": "sweep", "map": "uniform", "strengths": ",".join(f"{s:g}" for s in args.strengths)}
        written = _write(sweep_grid(outputs, args.strengths, args.columns), args, steps_run, extra, args.output)
        line = ""
    plural = "" if steps_run == 1 else "s"
    seconds = time.perf_counter() - started
    print(f"{cli.display(written)} ({seconds:.1f}s, {steps_run} denoising step{plural}){line}")


def _write(picture: Image.Image, args, steps_run: int, extra: dict, path: Path) -> Path:
    return results.write_png(picture, path, results.png_parameters(args, steps_run, extra), overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> None:
    cli.main(lambda: run(argv))


if __name__ == "__main__":
    main()
