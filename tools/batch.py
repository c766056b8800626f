"""Batch editing: one model, every row of a jobs file, on one device or many, resumable.

    python -m tools.batch --family sd2 jobs.csv --output-dir out/ --steps 50
    accelerate launch --num_processes 4 -m tools.batch --family sdxl jobs.jsonl --output-dir out/

The jobs file is CSV (with a header) or JSON Lines (one object a line). Each row is one edit:

    image            the image to edit                                         (default: --image)
    map              its keep map, white = keep                                (default: --map)
    mask, feather    or an inpainting mask (white = fill) and its soft band in pixels, made into a keep map as
    grow             run.py's --mask makes it (cli.mask_to_keep_map), after growing the mask by grow pixels
                     (defaults: --mask, --feather, --grow; feather and grow 0)
    prompt           (default: --prompt)
    negative_prompt, seed, strength, steps, guidance_scale      (defaults: the flags of the same name)
    output           the PNG to write, relative to --output-dir (default: <row number>-<image name>.png there)

Relative input paths are relative to the jobs file's folder. Any flag of the model's run.py (--model, --scheduler,
--invert-map, --compare, ...) applies to every row. ``--invert-map`` applies to maps; a mask is always an inpainting
mask, white = fill.

Every row is checked before any model loads; a file with bad rows runs nothing (unless --skip-bad-rows) and lists
them as ``jobs.csv:<line>: <problem>``. Each output is written atomically with the row's parameters as PNG text; a
rerun skips every row whose output already holds exactly that edit, so an interrupted batch resumes where it
stopped (--overwrite redoes them). A failing row is reported and counted, and the others go on. The summary ends up
in ``<output-dir>/summary.json``.

Under ``accelerate launch`` or ``torchrun`` the rows are split between the processes with
``accelerate.PartialState.split_between_processes``; the main process plans the work and writes the summary. Each
row's noise comes from its own seed, so a row's result does not depend on the number of processes, nor on its batch
mates but for rounding: a batched call adds in another order, so a few pixels may differ by one level of 255.

A model's run.py takes part through three functions (see SD2/run.py): ``build_parser()``, ``load_pipelines(args)``
and ``edit(pipelines, args, *, images, maps, prompts, negative_prompts, seeds) -> (images, steps_run)``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import functools
import io
import json
import os
import secrets
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script path (torchrun tools/batch.py): make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, PngImagePlugin  # noqa: E402

from tools import cli  # noqa: E402
from tools.fan import families, load_family  # noqa: E402  (one way to find a model's run.py, for every tool)

COLUMNS = ("image", "map", "mask", "feather", "grow", "prompt", "negative_prompt", "seed", "strength", "steps",
           "guidance_scale", "output")
JOBS_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SUMMARY_NAME = "summary.json"
MAX_BATCH_SIZE = 4096

# Arguments that never change a result: they are left out of the resume check and off the PNG text.
_NOT_PARAMETERS = {"output", "overwrite", "compare", "offload", "device", "dtype", "torch_dtype", "command", "jobs",
                   "family", "output_dir", "batch_size", "skip_bad_rows"}
# PNG text that records how a result was made, not what it is: a resumed row may differ in these.
_NOT_MATCHED = {"steps_run", "command", "device", "dtype", "Software", "jobs", "line"}
# Per-row values: the row, not the command line, gives them.
_ROW_VALUES = {"image", "map", "mask", "feather", "grow", "prompt", "negative_prompt", "seed", "strength", "steps",
               "guidance_scale"}


@dataclasses.dataclass
class Job:
    """One valid row of the jobs file, with every default filled in and every path absolute."""

    line: int
    image: Path
    map: Path | None
    mask: Path | None
    feather: float
    grow: float
    prompt: str
    negative_prompt: str
    seed: int
    strength: float
    steps: int
    guidance_scale: float
    output: Path
    batch_key: tuple = ()  # rows with equal keys can share one pipeline call


@dataclasses.dataclass
class Plan:
    """What the main process found: the jobs to run, grouped into batches, and the rows it leaves out."""

    jobs: list[Job]
    batches: list[list[int]]  # indexes into `jobs`, for the rows to run
    skipped: list[int]  # rows whose output already holds their result
    bad: list[tuple[int, list[str]]]  # (line, problems) for rows left out by --skip-bad-rows
    rows: int  # rows in the file


# ---------------------------------------------------------------------------------------------------------------
# Command line


def run(argv: list[str] | None = None) -> int:
    """The whole batch; returns the exit status (0 all done, 1 some rows failed). Errors raise ``cli.CliError``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    module = load_family(_family_name(argv))
    args = parse_args(module, argv)
    state = _process_state(args)
    plan = _shared(state, lambda: make_plan(args))
    started = time.perf_counter()
    with state.split_between_processes(plan.batches) as my_batches:
        results = _run_share(state, module, args, plan.jobs, my_batches)
    return _finish(state, args, plan, results, time.perf_counter() - started)


def _family_name(argv: list[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--family", type=str.lower)
    known, _ = pre.parse_known_args(argv)
    if known.family is None:
        if {"-h", "--help"} & set(argv):
            print(__doc__.strip())
            print(f"\nPass --family ({', '.join(families())}) with --help to list every flag.")
            raise SystemExit(0)
        raise cli.CliError(f"--family is required: one of {', '.join(families())} (see --help)")
    return known.family


def build_parser(module) -> argparse.ArgumentParser:
    """The model's own parser, whose flags become every row's defaults, plus the batch flags."""
    parser = module.build_parser()
    parser.prog = "python -m tools.batch"
    parser.description = (f"Edit every row of a jobs file with the model of {cli._display(Path(module.__file__))}. "
                          "The model's flags below are the defaults for every row.")
    group = parser.add_argument_group("batch")
    group.add_argument("jobs", metavar="JOBS", help="jobs file: .csv with a header row, or .jsonl (one JSON "
                       f"object a line); columns: {', '.join(COLUMNS)}")
    group.add_argument("--family", required=True, type=str.lower, choices=list(families()),
                       help="the model folder whose run.py does the edits")
    group.add_argument("--output-dir", required=True, metavar="DIR",
                       help="folder for the results and summary.json; created if missing")
    group.add_argument("--batch-size", type=cli._integer(1, MAX_BATCH_SIZE), default=1, metavar="N",
                       help="rows per pipeline call, among rows of equal image size, map (or mask), steps, "
                       "strength and guidance (default: 1)")
    group.add_argument("--skip-bad-rows", action="store_true",
                       help="run the good rows even if others are bad (default: off, run nothing)")
    _reword_help(parser)
    return parser


def _reword_help(parser: argparse.ArgumentParser) -> None:
    """The run.py flags that mean something else for a batch say so in --help."""
    default_for_rows = {
        "image": "default image, for rows without one",
        "map": "default keep map (white = keep), for rows with neither map nor mask",
        "mask": "default inpainting mask (white = fill, whatever --invert-map), for rows with neither map nor mask",
        "feather": "default width in image pixels of a mask's soft band; 0 is a hard mask (default: 0)",
        "grow": "default growth of a mask before feathering, in image pixels (default: 0)",
        "prompt": "default prompt, for rows without one",
        "negative_prompt": "default negative prompt, for rows without one (default: as run.py's)",
        "overwrite": "redo rows whose output already holds their result, and replace it (default: off, skip them)",
        "output": argparse.SUPPRESS,  # one file per row: --output-dir and the output column name them
    }
    for action in parser._actions:
        if action.dest in default_for_rows:
            action.help = default_for_rows[action.dest]


def parse_args(module, argv: list[str]) -> argparse.Namespace:
    """Parses the command line and checks what needs neither the jobs file nor a model."""
    parser = build_parser(module)
    args = parser.parse_args(argv)
    # The negative prompt run.py falls back on is generic (assets/negative_prompt.txt): rows fall back on it too,
    # so that a row gives what run.py gives. The example prompt is not: a row without a prompt is an error.
    example = getattr(parser, "example", None)
    args.negative_prompt = cli._text_argument(args.negative_prompt, example.negative_prompt if example else "",
                                              "--negative-prompt")
    if args.output is not None:
        raise cli.CliError("--output names one file, and a batch writes one per row: use --output-dir, and the "
                           "jobs file's output column to name them")
    if args.offload and args.device == "cpu":
        raise cli.CliError("--offload moves each model onto the GPU only while it runs; it needs --device cuda or "
                           "mps")
    args.device, args.torch_dtype = cli.pick_device(args.device, args.dtype)
    args.dtype = cli._dtype_name(args.torch_dtype)
    args.jobs = Path(args.jobs).expanduser()
    args.output_dir = Path(args.output_dir).expanduser()
    if Path(args.model).expanduser().is_dir():  # the results record it, and a rerun from elsewhere must match them
        args.model = str(Path(args.model).expanduser().absolute())
    for flag in ("image", "map", "mask"):
        if getattr(args, flag, None) is not None:
            path = Path(getattr(args, flag)).expanduser().absolute()
            with cli._reading_image(path, f"--{flag}"):
                Image.open(path).close()
            setattr(args, flag, path)
    args.command = shlex.join(["python", "-m", "tools.batch", *argv])
    return args


def _process_state(args: argparse.Namespace):
    """This process's place among the processes that ``accelerate launch`` or ``torchrun`` started, if any."""
    from accelerate import PartialState

    # Without cpu=True, CPU processes would each be rank 0 of 1. On GPUs, PartialState makes this process's own GPU
    # the current one, which is where "cuda" (model loading, cli.load_pipeline's offload) then puts the model.
    return PartialState(cpu=args.device == "cpu")


def _shared(state, make):
    """``make()`` on the main process, handed to every process; a ``CliError`` there ends them all."""
    from accelerate.utils import broadcast_object_list

    outcome = [None]
    if state.is_main_process:
        try:
            outcome = [("plan", make())]
        except cli.CliError as error:
            outcome = [("error", (str(error), error.exit_code))]
    kind, value = broadcast_object_list(outcome)[0]
    if kind == "plan":
        return value
    message, exit_code = value
    if state.is_main_process:
        raise cli.CliError(message, exit_code)
    raise SystemExit(exit_code)  # the main process says why


# ---------------------------------------------------------------------------------------------------------------
# Reading the jobs file


@dataclasses.dataclass
class Row:
    line: int
    number: int  # 1 for the first row of jobs, whatever its line
    cells: dict[str, str]
    problems: list[str]
    unreadable: bool = False  # no cells could be read: its problems say why, and nothing else is checked


def read_jobs(path: Path) -> list[Row]:
    """The rows of a CSV or JSON Lines jobs file, cells as stripped text ("" where empty or absent)."""
    shown = cli._display(path)
    kind = JOBS_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise cli.CliError(f"{shown}: a jobs file must be .csv or .jsonl, not {path.suffix or 'without a suffix'}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often start CSV with a byte-order mark
    except FileNotFoundError:
        raise cli.CliError(f"{shown}: no such jobs file") from None
    except IsADirectoryError:
        raise cli.CliError(f"{shown}: is a folder, not a jobs file") from None
    except UnicodeDecodeError:
        raise cli.CliError(f"{shown}: not UTF-8 text; save the jobs file as UTF-8") from None
    except OSError as error:
        raise cli.CliError(f"{shown}: cannot read it: {cli._one_line(error)}") from None
    rows = _read_csv(text, shown) if kind == "csv" else _read_jsonl(text)
    if not rows:
        raise cli.CliError(f"{shown}: holds no jobs")
    return rows


def _column(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _read_csv(text: str, shown: str) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header, rows = None, []
    while True:
        line = reader.line_num + 1  # where this record starts; a quoted cell may span lines
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            raise cli.CliError(f"{shown}:{reader.line_num}: not valid CSV: {error}") from None
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header = [_column(cell) for cell in cells]
            _check_header(header, shown, line)
            continue
        problems = []
        if len(cells) > len(header):
            problems.append(f"has {len(cells)} cells, but the header names {len(header)} columns")
        values = {name: cell.strip() for name, cell in zip(header, cells)}
        rows.append(Row(line, len(rows) + 1, values, problems))
    return rows


def _check_header(header: list[str], shown: str, line: int) -> None:
    unknown = [name for name in header if name not in COLUMNS]
    if unknown:
        raise cli.CliError(f"{shown}:{line}: unknown column {', '.join(map(repr, unknown))}; the columns are "
                           f"{', '.join(COLUMNS)}")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise cli.CliError(f"{shown}:{line}: column {', '.join(map(repr, repeated))} appears twice")


def _read_jsonl(text: str) -> list[Row]:
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines breaks at
    for line, content in enumerate(text.split("\n"), start=1):
        if not content.strip():
            continue
        row = Row(line, len(rows) + 1, {}, [])
        rows.append(row)
        try:
            value = json.loads(content)
        except json.JSONDecodeError as error:
            row.problems.append(f"not valid JSON: {error.msg} (column {error.colno})")
            row.unreadable = True
            continue
        if not isinstance(value, dict):
            row.problems.append("must be a JSON object, {\"image\": ..., \"prompt\": ...}")
            row.unreadable = True
            continue
        for key, cell in value.items():
            name = _column(key)
            if name not in COLUMNS:
                row.problems.append(f"unknown key {key!r}; the keys are {', '.join(COLUMNS)}")
            elif isinstance(cell, bool) or not isinstance(cell, (str, int, float, type(None))):
                row.problems.append(f"{name} must be text or a number, not {json.dumps(cell)}")
            else:
                row.cells[name] = "" if cell is None else str(cell).strip()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Checking the rows and planning the work


def make_plan(args: argparse.Namespace) -> Plan:
    """Reads and checks every row; prints the bad ones. Runs on the main process only, before any model loads."""
    jobs_shown = cli._display(args.jobs)
    _check_output_dir(args.output_dir)
    rows = read_jobs(args.jobs)
    checker = _RowChecker(args, args.jobs.parent)
    jobs, bad = [], []
    for row in rows:
        job, problems = checker.job(row)
        if problems:
            bad.append((row.line, problems))
        else:
            jobs.append(job)
    jobs, collisions = _drop_colliding_outputs(jobs, args)
    bad += collisions
    skipped, pending, taken = _existing_outputs(jobs, args)
    bad += taken
    bad.sort()
    for line, problems in bad:
        for problem in problems:
            print(f"{jobs_shown}:{line}: {problem}", file=sys.stderr)
    if bad and not args.skip_bad_rows:
        count = f"{len(bad)} bad row{'s' if len(bad) > 1 else ''}"
        raise cli.CliError(f"{jobs_shown}: {count} (listed above); nothing was run. Fix them, or pass "
                           "--skip-bad-rows to run the other rows")
    bad_lines = {line for line, _ in bad}
    keep = {index for index, job in enumerate(jobs) if job.line not in bad_lines}
    _make_output_dir(args.output_dir)
    for index in keep:
        for target in _targets(jobs[index], args):
            _remove_partial_files(target)
    pending = [index for index in pending if index in keep]
    skipped = [index for index in skipped if index in keep]
    return Plan(jobs, group_into_batches(jobs, pending, args.batch_size), skipped, bad, len(rows))


def _check_output_dir(folder: Path) -> None:
    shown = cli._display(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise cli.CliError(f"--output-dir {shown}: {cli._display(existing)} is a file, not a folder")
    if not _writable(existing):
        what = "is not writable" if existing == folder else f"cannot be made: {cli._display(existing)} is not writable"
        raise cli.CliError(f"--output-dir {shown}: {what}")


def _writable(folder: Path) -> bool:
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:  # os.access trusts the permission bits alone; a read-only mount says no only when we try
        probe = folder / f".write-test-{secrets.token_hex(4)}"
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError:
        return False
    return True


def _make_output_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise cli.CliError(f"--output-dir {cli._display(folder)}: cannot create it: {cli._one_line(error)}",
                           cli.EXIT_RUN_FAILED) from None


class _RowChecker:
    """Turns rows into ``Job``s, filling in the command line's defaults; collects every problem of a row."""

    def __init__(self, args: argparse.Namespace, base: Path):
        self.args, self.base = args, base
        self.headers: dict[Path, tuple | str] = {}  # path -> (size, mode), or the problem; a map may serve many rows

    def job(self, row: Row) -> tuple[Job | None, list[str]]:
        if row.unreadable:
            return None, row.problems
        cells, args, problems = row.cells, self.args, list(row.problems)
        image = self._path(cells, "image", args.image, problems, required=True)
        map_path, mask = self._map_or_mask(cells, problems)
        feather = grow = 0.0
        if mask is not None:  # as in run.py: a mask without --feather is a hard mask
            pixels = cli._real(0.0, cli.MAX_FEATHER_PX)
            feather = self._number(cells, "feather", args.feather or 0.0, pixels, problems)
            grow = self._number(cells, "grow", args.grow or 0.0, pixels, problems)
        elif map_path is not None:
            for name in ("feather", "grow"):
                if cells.get(name):
                    problems.append(f"{name} applies to a mask, and this row has a map")
        prompt = cells.get("prompt") or args.prompt
        if not prompt:
            problems.append("no prompt: fill the prompt column, or pass --prompt")
        negative_prompt = cells.get("negative_prompt") or args.negative_prompt
        seed = self._number(cells, "seed", args.seed, cli._integer(0, cli.MAX_SEED), problems)
        strength = self._number(cells, "strength", args.strength, cli._real(0.0, 1.0), problems)
        steps = self._number(cells, "steps", args.steps, cli._integer(1, cli.MAX_STEPS), problems)
        guidance = self._number(cells, "guidance_scale", args.guidance_scale, cli._real(0.0), problems)
        output = self._output(cells, row, image, problems)
        if problems:
            return None, problems
        job = Job(row.line, image, map_path, mask, feather, grow, prompt, negative_prompt, seed, strength, steps,
                  guidance, output)
        # One call runs every image from the earliest step that any of its maps releases, and multistep schedulers
        # (DPM-Solver++, PNDM, UniPC) carry what those steps saw into later ones: rows batch only with rows of the
        # same map, so that each starts where it would alone.
        map_identity = ("map", map_path) if map_path is not None else ("mask", mask, feather, grow)
        job.batch_key = (self.headers[image][0], map_identity, steps, strength, guidance)
        return job, []

    def _path(self, cells, name, default, problems, required=False) -> Path | None:
        text = cells.get(name, "")
        if not text:
            if default is None and required:
                problems.append(f"no {name}: fill the {name} column, or pass --{name}")
            elif default is not None:
                self._header(default, name)  # parse_args read it already: this only records its size
            return default
        path = Path(text).expanduser()
        path = (path if path.is_absolute() else self.base / path).absolute()
        header = self._header(path, name)
        if isinstance(header, str):
            problems.append(header)
            return None
        return path

    def _header(self, path: Path, name: str) -> tuple | str:
        if path not in self.headers:
            try:
                with cli._reading_image(path, name), Image.open(path) as opened:
                    size = opened.size
                    if _orientation(opened) in (5, 6, 7, 8):  # EXIF rotations by 90 degrees: loading turns
                        size = size[::-1]  # the picture upright, and so the batch groups by that size
                    self.headers[path] = (size, opened.mode)
            except cli.CliError as error:
                self.headers[path] = str(error)
        return self.headers[path]

    def _map_or_mask(self, cells, problems) -> tuple[Path | None, Path | None]:
        if cells.get("map") and cells.get("mask"):
            problems.append("has both a map and a mask; give one of them")
            return None, None
        if cells.get("map") or cells.get("mask"):
            map_path = self._path(cells, "map", None, problems)
            mask = self._path(cells, "mask", None, problems)
            return map_path, mask
        args = self.args
        if args.map is not None and args.mask is not None:
            problems.append("has neither map nor mask, and both --map and --mask are given; fill one column")
        elif args.map is None and args.mask is None:
            problems.append("no map: fill the map column (or mask and feather), or pass --map")
        else:
            self._header(args.map or args.mask, "map")
        return args.map, args.mask

    @staticmethod
    def _number(cells, name, default, parse, problems):
        text = cells.get(name, "")
        if not text:
            return default
        try:
            return parse(text)
        except argparse.ArgumentTypeError as error:
            problems.append(f"{name} {error}")
            return None

    def _output(self, cells, row: Row, image: Path | None, problems) -> Path | None:
        text = cells.get("output", "")
        if not text:
            stem = image.stem if image is not None else "row"
            return (self.args.output_dir / f"{row.number:04d}-{stem}.png").absolute()
        path = Path(text).expanduser()
        path = (path if path.is_absolute() else self.args.output_dir / path).absolute()
        if path.suffix.lower() != ".png":
            problems.append(f"output {text}: must end with .png (the parameters are stored as PNG text)")
        elif path.is_dir():
            problems.append(f"output {text}: is a folder; give a file name ending with .png")
        elif not _inside(path, self.args.output_dir.absolute()):
            problem = _folder_problem(path.parent)
            if problem:
                problems.append(f"output {text}: {problem}")
        return path


def _orientation(opened: Image.Image) -> int:
    """The EXIF orientation, read from the header only (``getexif`` would decode a whole PNG to look further)."""
    if "exif" not in opened.info:
        return 1
    exif = Image.Exif()
    try:
        exif.load(opened.info["exif"])
    except (OSError, SyntaxError, ValueError):
        return 1
    return exif.get(0x0112, 1)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _folder_problem(folder: Path) -> str | None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{cli._display(existing)} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"the folder {cli._display(existing)} is not writable"
    return None


def _targets(job: Job, args: argparse.Namespace) -> list[Path]:
    return [job.output, cli.compare_path(job.output)] if args.compare else [job.output]


def _drop_colliding_outputs(jobs: list[Job], args) -> tuple[list[Job], list[tuple[int, list[str]]]]:
    """Two rows may not write the same file, and no row may write over an input (of any row, or the jobs file)."""
    inputs: dict[object, str] = {}
    for identity in _identities(args.jobs):
        inputs[identity] = "the jobs file"
    for job in jobs:
        for what, path in (("image", job.image), ("map", job.map), ("mask", job.mask)):
            for identity in _identities(path):
                inputs.setdefault(identity, f"the {what} of line {job.line}")
    written: dict[object, int] = {}
    kept, bad = [], []
    for job in jobs:
        problems = []
        for target in _targets(job, args):
            identities = _identities(target)
            source = next((inputs[i] for i in identities if i in inputs), None)
            if source:
                problems.append(f"output {cli._display(target)} is {source}; inputs are never overwritten")
            other = next((written[i] for i in identities if i in written), None)
            if other is not None:
                problems.append(f"output {cli._display(target)} is also written by line {other}")
            for identity in identities:
                written.setdefault(identity, job.line)
        (bad.append((job.line, problems)) if problems else kept.append(job))
    return kept, bad


def _identities(path: Path | None) -> list[object]:
    """What makes two paths the same file: the resolved path and, for a file that exists, device and inode."""
    if path is None:
        return []
    identities: list[object] = [os.path.realpath(path)]
    try:
        stat = path.stat()
        identities.append((stat.st_dev, stat.st_ino))  # hard links too
    except OSError:
        pass
    return identities


def _existing_outputs(jobs: list[Job], args) -> tuple[list[int], list[int], list[tuple[int, list[str]]]]:
    """Splits the jobs into (already done, to run, taken by another file)."""
    done, pending, taken = [], [], []
    for index, job in enumerate(jobs):
        if args.overwrite or not job.output.exists():
            pending.append(index)
            continue
        mismatch = _result_mismatch(job.output, row_parameters(job, args))
        if mismatch is None:
            done.append(index)
        else:
            taken.append((job.line, [
                f"{cli._display(job.output)} exists and {mismatch}; delete it, name another output, or pass "
                "--overwrite to redo every row"
            ]))
    return done, pending, taken


def _result_mismatch(path: Path, expected: dict[str, str]) -> str | None:
    """None when ``path`` is a readable PNG holding exactly the edit ``expected`` describes, else why not."""
    try:
        with Image.open(path) as opened:
            if opened.format != "PNG":
                return "is not a PNG, so not this row's result"
            stored = {key: value for key, value in opened.info.items() if isinstance(value, str)}
            opened.verify()  # every chunk's checksum: a truncated or damaged file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "is not a readable PNG, so not this row's result"
    if stored.get("Software") != "differential-diffusion":
        return "was not written by this project"
    for key, value in expected.items():
        if key not in _NOT_MATCHED and stored.get(key) != value:
            return f"holds another edit (its {key} is {stored.get(key)!r}, this row's is {value!r})"
    return None


def _remove_partial_files(output: Path) -> None:
    """Deletes what a killed run left half-written for this output (``cli.write_png``'s temporary names)."""
    for partial in output.parent.glob(f".{glob_escape(output.name)}.*.partial"):
        partial.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def group_into_batches(jobs: list[Job], indexes: list[int], batch_size: int) -> list[list[int]]:
    """Rows that can share a pipeline call, ``batch_size`` at most, in the order they first appear."""
    groups: dict[tuple, list[int]] = {}
    for index in indexes:
        groups.setdefault(jobs[index].batch_key, []).append(index)
    batches = []
    for members in groups.values():
        batches += [members[start:start + batch_size] for start in range(0, len(members), batch_size)]
    return sorted(batches, key=lambda batch: batch[0])


# ---------------------------------------------------------------------------------------------------------------
# Parameters


def row_parameters(job: Job, args: argparse.Namespace) -> dict[str, str]:
    """The PNG text of a row's result, as run.py writes it, but for the fields known only once it has run.

    Input paths are absolute: a rerun from another folder must still recognise its results.
    """
    params = cli.png_parameters(_row_args(job, args), steps_run=0,
                                extra_params={"family": args.family, **_model_flags(args)})
    params["image"] = str(job.image)
    if job.mask is not None:
        params["mask"] = str(job.mask)
    else:
        params["map"] = str(job.map)
    for key in ("steps_run", "command"):
        params.pop(key)
    return params


def _model_flags(args: argparse.Namespace) -> dict[str, str]:
    """Flags of the model's run.py beyond the common ones (SDXL's refiner, say): they shape every result too."""
    skip = _common_flags() | _NOT_PARAMETERS | _ROW_VALUES
    return {key: str(value) for key, value in sorted(vars(args).items()) if key not in skip}


@functools.cache
def _common_flags() -> frozenset[str]:
    parser = cli.build_parser("", default_model="", default_steps=1, default_guidance=0.0)
    return frozenset(vars(parser.parse_args([])))


def _row_args(job: Job, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` as run.py would have them for this row alone."""
    row_args = copy.copy(args)
    for name in ("image", "map", "mask", "feather", "grow", "prompt", "negative_prompt", "seed", "strength", "steps",
                 "guidance_scale", "output"):
        setattr(row_args, name, getattr(job, name))
    return row_args


# ---------------------------------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class Result:
    line: int
    status: str  # "done" or "failed"
    output: str
    reason: str = ""
    process: int = 0


def _run_share(state, module, args, jobs: list[Job], batches: list[list[int]]) -> list[Result]:
    """Runs this process's batches; one row's failure is reported, and the rest go on."""
    if not batches:
        return []
    from tqdm.auto import tqdm

    if not state.is_main_process:  # one set of loading bars, the main process's, is enough
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    pipelines = module.load_pipelines(args)
    _quiet_progress_bars(pipelines)  # one bar for the whole batch instead of one per pipeline call
    total = sum(len(batch) for batch in batches)
    label = "rows" if state.num_processes == 1 else f"rows (process 1 of {state.num_processes})"
    runner = _Runner(state, module, args, pipelines)
    with tqdm(total=total, desc=label, unit="row", disable=not state.is_main_process, file=sys.stderr) as bar:
        runner.bar = bar
        for batch in batches:
            runner.run([jobs[index] for index in batch])
    return runner.results


def _quiet_progress_bars(pipelines) -> None:
    if hasattr(pipelines, "set_progress_bar_config"):
        pipelines.set_progress_bar_config(disable=True)
    elif isinstance(pipelines, dict):
        for value in pipelines.values():
            _quiet_progress_bars(value)
    elif isinstance(pipelines, (list, tuple)):
        for value in pipelines:
            _quiet_progress_bars(value)
    elif hasattr(pipelines, "__dict__") and not isinstance(pipelines, type):
        for value in vars(pipelines).values():
            if hasattr(value, "set_progress_bar_config"):
                value.set_progress_bar_config(disable=True)


class _Runner:
    def __init__(self, state, module, args, pipelines):
        self.state, self.module, self.args, self.pipelines = state, module, args, pipelines
        self.results: list[Result] = []
        self.bar = None

    def run(self, batch: list[Job]) -> None:
        loaded = []
        for job in batch:
            try:
                loaded.append((job, load_row_inputs(job, self.args)))
            except Exception as error:  # noqa: BLE001 - one row's failure must not end the batch
                self._failed(job, error)
        if loaded:
            self._edit(loaded)

    def _edit(self, loaded) -> None:
        jobs = [job for job, _ in loaded]
        first = jobs[0]
        try:
            images, steps_run = self.module.edit(  # steps, strength and guidance are the same for every row here
                self.pipelines, _row_args(first, self.args), images=[inputs[0] for _, inputs in loaded],
                maps=[inputs[1] for _, inputs in loaded], prompts=[job.prompt for job in jobs],
                negative_prompts=[job.negative_prompt for job in jobs], seeds=[job.seed for job in jobs],
            )
        except Exception as error:  # noqa: BLE001 - one row's failure must not end the batch
            _free_memory()
            if len(loaded) == 1:
                self._failed(first, error)
            else:  # find the row at fault, or get through with less memory: each row alone
                for item in loaded:
                    self._edit([item])
            return
        for (job, (image, map_image)), result in zip(loaded, images):
            try:
                written = self._write(job, result, image, map_image, steps_run)
            except Exception as error:  # noqa: BLE001 - one row's failure must not end the batch
                self._failed(job, error)
            else:
                self._add(Result(job.line, "done", str(written), process=self.state.process_index))

    def _write(self, job: Job, result: Image.Image, image, map_image, steps_run: int) -> Path:
        params = {**row_parameters(job, self.args), "steps_run": str(steps_run),
                  "command": self.args.command, "jobs": str(self.args.jobs.absolute()), "line": str(job.line)}
        info = PngImagePlugin.PngInfo()
        for key, value in params.items():
            info.add_text(key, value)
        try:
            job.output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise cli.CliError(f"cannot create {cli._display(job.output.parent)}: {cli._one_line(error)}") from None
        written = cli.write_png(result, job.output, info, overwrite=self.args.overwrite)
        if self.args.compare:
            strip = cli.compare_strip(image, map_image, result, invert_map=self.args.invert_map)
            cli.write_png(strip, cli.compare_path(written), info, overwrite=self.args.overwrite)
        return written

    def _failed(self, job: Job, error: BaseException) -> None:
        reason = str(error) if isinstance(error, cli.CliError) else f"{type(error).__name__}: {error}"
        reason = cli._one_line(reason) or type(error).__name__
        where = f"[process {self.state.process_index + 1} of {self.state.num_processes}] " \
            if self.state.num_processes > 1 else ""
        self._say(f"{where}{cli._display(self.args.jobs)}:{job.line}: failed: {reason}")
        self._add(Result(job.line, "failed", str(job.output), reason, self.state.process_index))

    def _add(self, result: Result) -> None:
        self.results.append(result)
        if self.bar is not None:
            self.bar.update(1)
            failed = sum(r.status == "failed" for r in self.results)
            if failed:
                self.bar.set_postfix(failed=failed)

    def _say(self, line: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)


def load_row_inputs(job: Job, args: argparse.Namespace) -> tuple[Image.Image, Image.Image]:
    """The row's RGB image and its map, read as run.py reads them, in the convention ``args.invert_map`` gives."""
    image, map_image = cli.load_inputs(_row_args(job, args))
    if job.mask is not None and args.invert_map:  # the pipeline inverts every map of the call; a mask's must survive
        map_image = Image.fromarray(1.0 - np.asarray(map_image, dtype=np.float32))
    return image, map_image


def _free_memory() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Summary


def _finish(state, args, plan: Plan, results: list[Result], seconds: float) -> int:
    from accelerate.utils import gather_object

    everyone = gather_object([dataclasses.asdict(result) for result in results])  # every process's rows
    if not state.is_main_process:
        return 0
    summary = make_summary(args, plan, everyone, seconds, state.num_processes)
    path = args.output_dir / SUMMARY_NAME
    _write_json(summary, path)
    print(f"{summary['done']} done, {summary['skipped']} skipped (already done), {summary['failed']} failed"
          + (f", {summary['bad']} bad" if summary["bad"] else "")
          + f" of {summary['rows']} rows in {seconds:.1f}s; summary: {cli._display(path)}")
    for failure in summary["failures"]:
        print(f"  failed: {cli._display(args.jobs)}:{failure['line']}: {failure['reason']}")
    return cli.EXIT_RUN_FAILED if summary["failed"] else 0


def make_summary(args, plan: Plan, results: list[dict], seconds: float, processes: int) -> dict:
    jobs_by_line = {job.line: job for job in plan.jobs}
    rows = [dict(result) for result in results]
    rows += [{"line": plan.jobs[index].line, "status": "skipped", "output": str(plan.jobs[index].output),
              "reason": "its output already holds this edit", "process": 0} for index in plan.skipped]
    rows += [{"line": line, "status": "bad", "output": "", "reason": "; ".join(problems), "process": 0}
             for line, problems in plan.bad]
    rows.sort(key=lambda row: row["line"])
    count = {status: sum(row["status"] == status for row in rows) for status in ("done", "skipped", "failed", "bad")}
    return {
        "jobs": str(args.jobs.absolute()),
        "family": args.family,
        "model": args.model,
        "output_dir": str(args.output_dir.absolute()),
        "processes": processes,
        "rows": plan.rows,
        **count,
        "seconds": round(seconds, 3),
        "failures": [{"line": row["line"], "image": str(jobs_by_line[row["line"]].image), "output": row["output"],
                      "reason": row["reason"]} for row in rows if row["status"] == "failed"],
        "bad_rows": [{"line": line, "problems": problems} for line, problems in plan.bad],
        "results": rows,
    }


def _write_json(data: dict, path: Path) -> None:
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        partial.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(partial, path)
    except OSError as error:
        raise cli.CliError(f"cannot write {cli._display(path)}: {cli._one_line(error)}", cli.EXIT_RUN_FAILED) from None
    finally:
        partial.unlink(missing_ok=True)


if __name__ == "__main__":
    cli.main(run)
