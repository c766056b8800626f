"""Batch editing: one model, every row of a jobs file, on one device or many, resumable (docs/batch.md).

    python -m tools.batch --family sd2 jobs.csv --output-dir out/ --steps 50
    accelerate launch --num_processes 4 -m tools.batch --family sdxl jobs.jsonl --output-dir out/

A model's run.py takes part through ``build_parser()``, ``load_pipelines(args)`` and ``edit(pipelines, args, *,
images, maps, prompts, negative_prompts, seeds) -> (images, steps_run)``; its flags set every row's defaults. A video
family's run.py (``VIDEO = True``, Wan/run.py) edits one video a row, through its ``holds_frames``, ``read_frames``,
``load_video``, ``load_maps``, ``frame_rate``, ``edit``, ``parameters`` and ``write_video``, and writes an mp4.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):  # started as a script path (torchrun tools/batch.py): make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from tools import cli, loading, results  # noqa: E402

COLUMNS = ("image", "video", "map", "mask", "feather", "grow", "prompt", "negative_prompt", "seed", "strength", "steps",
           "guidance_scale", "output")
SUMMARY_NAME, LOCK_NAME = "summary.json", ".batch.lock"
MAX_BATCH_SIZE = 4096
ROOM, ROOM_PER_ROW = '{"running": true}', 1024  # summary.json while a batch runs: room for its rows, and more
# PNG text that records how a result was made, not what it is: a resumed row may differ in these.
HOW_MADE = ("steps_run", "command", "device", "dtype", "jobs", "line")


class Args(cli.Args):
    """The command line: the model's flags, which are every row's defaults, and the batch's."""
    extra_params: dict  # what the results record beyond run.py's parameters: family, jobs file, the model's own flags
    video_family: bool  # the family edits videos: a row's output is an mp4


class Job(Args):
    """A row: ``Args`` as run.py would have them for it alone, and the key of the rows it may share a call with."""
    line: int
    batch_key: tuple


class Plan(NamedTuple):
    """What ``make_plan`` found."""
    batches: list[list[Job]]  # jobs to run together
    skipped: list[Job]  # rows whose output already holds their result
    bad: list[tuple[int, list[str]]]  # (line, problems) of rows left out
    rows: int  # how many the jobs file holds


def run(argv: list[str] | None = None) -> int:
    """The whole batch; returns the exit status (0 all done, 1 some rows failed). Errors raise ``cli.CliError``."""
    from accelerate import PartialState
    argv = sys.argv[1:] if argv is None else list(argv)
    module = loading.load_family(_family_name(argv))
    args = parse_args(module, argv)
    # Without cpu=True, CPU processes would each be rank 0 of 1; on GPUs, this makes the process's own GPU "cuda".
    state = PartialState(cpu=args.device == "cpu")
    with contextlib.ExitStack() as held:  # the output folder's lock, on the main process
        plan = _shared(state, lambda: make_plan(args, held))
        started, outcomes = time.perf_counter(), []
        try:
            with state.split_between_processes(plan.batches) as my_batches:
                run_batches(state, module, args, my_batches, outcomes)
        except KeyboardInterrupt:  # what was done still goes into summary.json; then cli.main says "interrupted"
            finish(state, args, plan, outcomes, time.perf_counter() - started, interrupted=True)
            raise
        return finish(state, args, plan, outcomes, time.perf_counter() - started)


def _family_name(argv: list[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--family", type=str.lower)
    if (family := pre.parse_known_args(argv)[0].family) is not None:
        return family
    if {"-h", "--help"} & set(argv):
        families = ", ".join(loading.families())
        print(__doc__.strip() + f"\n\nPass --family ({families}) with --help to list every flag.")
        raise SystemExit(0)
    raise cli.CliError(f"--family is required: one of {', '.join(loading.families())} (see --help)")


def parse_args(module, argv: list[str]) -> Args:
    """The command line, parsed by the model's parser (its flags are every row's defaults) plus the batch flags."""
    parser = module.build_parser()
    parser.prog = "python -m tools.batch"
    parser.description = (f"Edit every row of a jobs file with the model of {cli.display(module.__file__)}. The "
                          "model's flags below are the defaults for every row.")
    add = parser.add_argument_group("batch").add_argument
    batch_flags = [
        add("jobs", metavar="JOBS", help=f"jobs file: .csv with a header row, or .jsonl (one JSON object a line); "
            f"columns: {', '.join(COLUMNS)}"),
        add("--family", required=True, type=str.lower, choices=list(loading.families()),
            help="the model folder to use"),
        add("--output-dir", required=True, metavar="DIR", help="folder for the results and summary.json, created if "
            "missing; every output lies inside it"),
        add("--batch-size", type=cli.whole_number(1, MAX_BATCH_SIZE), default=1, metavar="N", help="rows per "
            "pipeline call, among rows of equal image size, map (or mask), steps, strength and guidance (default: 1)"),
        add("--skip-bad-rows", action="store_true", help="run the good rows even if others are bad (default: off)"),
    ]
    for_rows = {  # the run.py flags that mean something else in a batch say so
        "image": "default image, for rows without one", "prompt": "default prompt, for rows without one",
        "map": "default keep map (white = keep), for rows with neither map nor mask",
        "mask": "default inpainting mask (white = fill, whatever --invert-map), for rows with neither map nor mask",
        "negative_prompt": "default negative prompt, for rows without one (default: as run.py's)",
        "overwrite": "redo rows whose output already holds their result, and replace it (default: off, skip them)",
        "output": argparse.SUPPRESS,  # one file per row: --output-dir and the output column name them
    }
    for dest, help in for_rows.items():
        parser.common_flags[dest].help = help
    args = parser.parse_args(argv, Args())
    model_flags = [dest for dest in vars(args)  # in the parser's order
                   if dest not in parser.common_flags and dest not in {action.dest for action in batch_flags}]
    if args.output is not None:
        raise cli.CliError("--output names one file, and a batch writes one per row: use --output-dir, and the "
                           "jobs file's output column to name them")
    args.video_family = getattr(module, "VIDEO", False)
    if args.video_family and args.batch_size > 1:
        raise cli.CliError(f"--batch-size {args.batch_size}: --family {args.family} edits one video a call, as a "
                           "video's latents fill the memory that images share; leave --batch-size 1")
    # A row falls back on run.py's negative prompt, to give what run.py gives, but a row without a prompt is an error
    args.negative_prompt = cli.text_argument(args.negative_prompt, parser.example.negative_prompt, "--negative-prompt")
    cli.check_prompts(args.prompt, args.negative_prompt)
    cli.resolve_device(args)
    args.jobs, args.output_dir = Path(args.jobs).expanduser().absolute(), Path(args.output_dir).expanduser()
    # mkdir would say only "[Errno 17] File exists" (or 20) for a file where the folder, or one above it, should be
    if (file := next((p for p in [args.output_dir, *args.output_dir.parents] if p.exists()), None)) and file.is_file():
        raise cli.CliError(f"--output-dir {cli.display(args.output_dir)}: {cli.display(file)} is a file, not a folder; "
                           "name a folder (it is created if missing)")
    if Path(args.model).expanduser().is_dir():  # the results record it, and a rerun from elsewhere must match them
        args.model = str(Path(args.model).expanduser().absolute())
    for flag in ("image", "map", "mask"):
        if getattr(args, flag) is not None and not (args.video_family and flag == "map"):  # a video or folder too
            setattr(args, flag, cli.input_path(getattr(args, flag), None, f"--{flag}").absolute())
    for flag in ("video", "map") if args.video_family else ():
        if getattr(args, flag) is not None:
            setattr(args, flag, Path(getattr(args, flag)).expanduser().absolute())  # checked as every row's
    args.extra_params = {"family": args.family, "jobs": args.jobs, **{dest: vars(args)[dest] for dest in model_flags}}
    return args


def _shared(state, make):
    """``make()`` on the main process, handed to every process; a ``CliError`` there ends them all."""
    from accelerate.utils import broadcast_object_list
    outcome = [None]
    if state.is_main_process:
        try:
            outcome = [make()]
        except cli.CliError as error:
            outcome = [error]
    value = broadcast_object_list(outcome)[0]
    if isinstance(value, cli.CliError):
        raise value if state.is_main_process else SystemExit(value.exit_code)  # the main process says why
    return value


def read_jobs(path: Path) -> list[tuple[int, dict[str, str] | None, list[str]]]:
    """``(line, cells, problems)`` for every row of a .csv or .jsonl jobs file; cells are None if it is unreadable."""
    shown, kind = cli.display(path), path.suffix.lower()
    if kind not in (".csv", ".jsonl", ".ndjson"):
        raise cli.CliError(f"{shown}: a jobs file must be .csv or .jsonl, not {path.suffix or 'without a suffix'}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often start CSV with a byte-order mark
    except (OSError, UnicodeDecodeError) as error:
        raise cli.CliError(f"{shown}: cannot read it as UTF-8 text: {cli.one_line(error)}") from None
    rows = list(_read_csv(text, shown) if kind == ".csv" else _read_jsonl(text))
    if not rows:
        raise cli.CliError(f"{shown}: holds no jobs")
    return rows


def _column(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _read_csv(text: str, shown: str):
    reader, header, start = csv.reader(io.StringIO(text, newline="")), None, 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1  # where the record starts: a quoted cell may span lines
            if header is None and any(cell.strip() for cell in cells):
                header = [_column(cell) for cell in cells]
                wrong = sorted({name for name in header if name not in COLUMNS or header.count(name) > 1})
                if wrong:
                    raise cli.CliError(f"{shown}:{line}: unknown or repeated column {', '.join(map(repr, wrong))}; "
                                       f"the columns are {', '.join(COLUMNS)}")
            elif any(cell.strip() for cell in cells):
                too_many = [f"has {len(cells)} cells, but the header names {len(header)} columns"]
                yield line, {name: cell.strip() for name, cell in zip(header, cells)}, (
                    too_many if len(cells) > len(header) else [])
    except csv.Error as error:
        raise cli.CliError(f"{shown}:{reader.line_num}: not valid CSV: {error}") from None


def _read_jsonl(text: str):
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines breaks at
    for line, content in enumerate(text.split("\n"), start=1):
        try:
            value = json.loads(content) if content.strip() else {}
        except json.JSONDecodeError as error:
            yield line, None, [f"not valid JSON: {error.msg} (column {error.colno})"]
            continue
        if not isinstance(value, dict):
            yield line, None, ['must be a JSON object, {"image": ..., "prompt": ...}']
        elif value:
            cells = {_column(key): "" if cell is None else str(cell).strip() for key, cell in value.items()}
            problems = [f"unknown key {key!r}; the keys are {', '.join(COLUMNS)}" for key in value
                        if _column(key) not in COLUMNS]
            problems += [f"{_column(key)} must be text or a number, not {json.dumps(cell)}" for key, cell in
                         value.items() if isinstance(cell, bool) or not isinstance(cell, (str, int, float, type(None)))]
            yield line, cells, problems


def make_plan(args: Args, held: contextlib.ExitStack) -> Plan:
    """Checks every row, takes the output folder's lock into ``held`` and finds the rows already done."""
    # A map may serve many rows: read it once. A video family's inputs may be videos, or folders of frames.
    module = loading.load_family(args.family) if args.video_family else None
    rows, header = read_jobs(args.jobs), functools.cache(functools.partial(_header, module))
    jobs, bad = [], []
    for number, (line, cells, problems) in enumerate(rows, start=1):
        job = None if cells is None else make_job(args, line, number, cells, problems, header)
        (bad.append((line, problems)) if problems else jobs.append(job))
    # No row may write another row's output, or an input of any row, or the jobs file.
    claimed = {args.jobs.resolve(): "is the jobs file; inputs are never overwritten"}
    for job in jobs:
        for what in ("image", "video", "map", "mask"):
            if (path := getattr(job, what, None)) is not None:
                claimed.setdefault(path.resolve(), f"is the {what} of line {job.line}; inputs are never overwritten")
    for job in list(jobs):
        targets = [job.output, cli.compare_path(job.output)] if args.compare else [job.output]
        if problems := [f"output {cli.display(target)} {claimed[target]}" for target in targets if target in claimed]:
            bad.append((job.line, problems))
            jobs.remove(job)
        claimed.update({target: f"is also written by line {job.line}" for target in targets if target not in claimed})
    _refuse_bad_rows(bad, args)  # before the output folder is made: a bad file leaves no trace
    try:
        held.enter_context(locked(args.output_dir))
        held.enter_context(summary_room(args.output_dir / SUMMARY_NAME, len(rows)))
    except OSError as error:
        raise cli.CliError(f"--output-dir {cli.display(args.output_dir)}: cannot write into it: "
                           f"{cli.one_line(error)}") from None
    for partial in args.output_dir.rglob(".*.partial"):  # what a killed batch left half-written
        partial.unlink(missing_ok=True)
    groups: dict[tuple, list] = {}  # rows that can share a pipeline call, in the order they first appear
    skipped, taken = [], []
    for job in jobs:
        if args.overwrite or not job.output.exists():
            groups.setdefault(job.batch_key, []).append(job)
        elif not (mismatch := _mismatch(job.output, expected_text(module, job, header, args.extra_params))):
            skipped.append(job)
        else:
            taken.append((job.line, [f"{cli.display(job.output)} exists and {mismatch}; delete it, name another "
                                     "output, or pass --overwrite to redo every row"]))
    _refuse_bad_rows(taken, args)
    batches = sorted((members[start:start + args.batch_size] for members in groups.values()
                      for start in range(0, len(members), args.batch_size)), key=lambda batch: batch[0].line)
    return Plan(batches, skipped, sorted(bad + taken), len(rows))


def make_job(args: Args, line: int, number: int, cells: dict[str, str], problems: list[str], header) -> Job:
    """The row's job, the command line filling in what it leaves out; adds what is wrong to ``problems``."""

    def path(name, default):  # a relative path is relative to the jobs file; args.jobs and default are absolute
        return args.jobs.parent / Path(cells[name]).expanduser() if cells.get(name) else default
    job = Job(**{**vars(args), "line": line, "image": path("image", args.image)})
    if args.video_family:  # a video, or a still image edited as a video of equal frames, as its run.py takes them
        if cells.get("video") and cells.get("image"):
            problems.append("has both a video and an image (a still image edited as a video); give one of them")
        job.video = path("video", None) if cells.get("video") else None if cells.get("image") else args.video
        job.image = None if job.video else job.image
    elif cells.get("video"):
        videos = ", ".join(name for name in loading.families() if name not in loading.image_families())
        problems.append(f"video: --family {args.family} edits images; the video column is for a family that edits "
                        f"videos ({videos})")
    job.map, job.mask = ((path("map", None), path("mask", None)) if cells.get("map") or cells.get("mask")
                         else (args.map, args.mask))
    source = getattr(job, "video", None) or job.image
    if source is None:
        problems.append("no video: fill the video column (or image, for a still image), or pass --video" if
                        args.video_family else "no image: fill the image column, or pass --image")
    if (job.map is None) == (job.mask is None):
        problems.append("has both a map and a mask; give one of them" if job.map else
                        "no map: fill the map column (or mask and feather), or pass --map")
    elif job.map and (cells.get("feather") or cells.get("grow")):
        problems.append("feather and grow apply to a mask, and this row has a map")
    job.invert_map = args.invert_map and job.mask is None  # a mask is white = fill, whatever --invert-map
    inputs = [("image", job.image), ("video", getattr(job, "video", None)), ("map", job.map), ("mask", job.mask)]
    problems += [header(path, name)[1] for name, path in inputs if path is not None and header(path, name)[1]]
    for name, parse in cli.NUMBER_TYPES.items():  # each cell checked as run.py checks its flag; a bad row is dropped
        try:
            if cells.get(name):
                setattr(job, name, parse(cells[name]))
        except argparse.ArgumentTypeError as error:
            problems.append(f"{name} {error}")
    job.prompt = cells.get("prompt") or args.prompt
    if not job.prompt:
        problems.append("no prompt: fill the prompt column, or pass --prompt")
    job.negative_prompt = cells.get("negative_prompt") or args.negative_prompt
    problems += [f"{name}: {problem}" for name in ("prompt", "negative_prompt")
                 if (problem := cli.not_utf8(cells.get(name)))]
    folder, text = args.output_dir.resolve(), cells.get("output", "")
    suffix, stored = (".mp4", "in its comment tag") if args.video_family else (".png", "as PNG text")
    job.output = (folder / (text or f"{number:04d}-{source.stem if source else 'row'}{suffix}")).resolve()
    if job.output.suffix.lower() != suffix or job.output.is_dir():
        problems.append(f"output {text}: give a file name ending with {suffix} (the parameters are stored {stored})")
    elif folder not in job.output.parents:  # an absolute path, or ../, would lead out
        problems.append(f"output {text}: lies outside --output-dir {cli.display(args.output_dir)}; name a file "
                        "inside it")
    # A call runs from the earliest step any of its maps releases, and multistep schedulers carry what those steps saw
    # into later ones: rows batch only with rows of the same map, so that each starts where it would alone.
    source = ("map", job.map) if job.mask is None else ("mask", job.mask, job.feather, job.grow)
    size = header(job.image, "image")[0] if job.image else None
    job.batch_key = (line,) if args.video_family else (size, source, job.steps, job.strength, job.guidance_scale)
    return job


def _header(module, path: Path, name: str) -> tuple[tuple[int, int] | None, str | None, float | None]:
    """``(size, None, frame rate)`` for a readable image, or for a video or folder of frames that the video family
    ``module`` reads (an image has no frame rate: None); ``(None, what is wrong, None)`` otherwise."""
    try:
        if module is not None and name != "mask" and module.holds_frames(path):
            frames, fps = module.read_frames(path, name, 1, gray=name == "map")
            return frames[0].size, None, fps
        with cli.reading(path, name), cli.open_image(path) as opened:
            return opened.size, None, None
    except cli.CliError as error:
        return None, str(error), None


def expected_text(module, job: Job, header, extra_params: dict) -> dict[str, str]:
    """What the output of ``job`` holds as its parameters (a video family's, ``module``'s; frame rate and all)."""
    if module is None:
        return results.png_parameters(job, 0, extra_params)
    fps = module.frame_rate(job, job.video and header(job.video, "video")[2])
    return module.parameters(job, 0, fps, extra_params)


def _refuse_bad_rows(bad: list[tuple[int, list[str]]], args) -> None:
    """Prints the bad rows; without --skip-bad-rows, runs nothing."""
    for line, problems in sorted(bad):
        for problem in problems:
            print(f"{cli.display(args.jobs)}:{line}: {problem}", file=sys.stderr)
    if bad and not args.skip_bad_rows:
        raise cli.CliError(f"{cli.display(args.jobs)}: {len(bad)} bad row{'s' * (len(bad) > 1)} (listed above); "
                           "nothing was run. Fix them, or pass --skip-bad-rows to run the other rows")


@contextlib.contextmanager
def locked(folder: Path):
    """Makes ``folder`` if missing and holds its batch lock; at the end, removes the lock's file, and the folder if it
    made it and it stayed empty (a batch refused at the model). The system drops the lock however the process ends."""
    import fcntl
    path, made = folder / LOCK_NAME, not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not (path.exists() and os.path.samestat(os.fstat(file.fileno()), path.stat())):
                raise BlockingIOError  # we locked the file of a batch that has just ended and removed it
        except BlockingIOError:
            file.seek(0)
            raise cli.CliError(f"--output-dir {cli.display(folder)}: another batch (process {file.read().strip()}) is "
                               "writing into it; wait for it to end, or use another --output-dir") from None
        file.truncate(0)
        print(os.getpid(), file=file, flush=True)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still held, so no other batch can hold this file meanwhile
            with contextlib.suppress(OSError):  # not empty: it holds results, or files of the user's
                if made:
                    folder.rmdir()


@contextlib.contextmanager
def summary_room(path: Path, rows: int):
    """Holds room for summary.json while the batch runs: ``finish`` writes into it if the disk fills up. A batch
    refused before it ran (another family's checkpoint) gives it back."""
    made = not path.exists() and path.write_text(ROOM + " " * (ROOM_PER_ROW * (rows + 4)) + "\n")
    try:
        yield
    except cli.CliError:
        if made and path.read_text().startswith(ROOM):
            path.unlink()
        raise


def _mismatch(path: Path, expected: dict[str, str]) -> str | None:
    """Why ``path`` is not the result of the edit the PNG text ``expected`` describes; None when it is."""
    try:
        if path.suffix.lower() == ".mp4":
            stored = results.mp4_parameters(path)  # ffmpeg reads the whole container: a damaged one fails
        else:
            with Image.open(path) as opened:
                stored = {key: value for key, value in opened.info.items() if isinstance(value, str)}
                opened.verify()  # every chunk's checksum: a truncated or damaged file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return f"is not a readable {path.suffix[1:].upper()}, so not this row's result"
    if stored.get("Software") != "differential-diffusion":
        return "was not written by this project"
    # Both sides' keys: a flag that one edit records and the other does not (a crop margin, say) is a difference too.
    keys = [key for key in {**stored, **expected} if key not in HOW_MADE]
    wrong = next((key for key in keys if stored.get(key) != expected.get(key)), None)
    return wrong and f"holds another edit (its {wrong} is {stored.get(wrong)!r}, this row's is {expected.get(wrong)!r})"


def run_batches(state, module, args, batches: list[list], outcomes: list[dict]) -> None:
    """Runs this process's batches, adding one result per row to ``outcomes``; a row that fails ends nothing else."""
    if not batches:
        return
    import gc
    import diffusers
    import torch
    import transformers
    from tqdm.auto import tqdm
    if not state.is_main_process:  # one set of loading bars, the main process's, is enough
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    pipelines = module.load_pipelines(args)
    parser, script = module.build_parser(), ["python", cli.display(module.__file__)]  # what a row's PNG records
    for pipe in pipelines if isinstance(pipelines, tuple) else [pipelines]:
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)  # one bar for the whole batch, not one per call

    def record(job, output: Path, error: Exception | None = None) -> None:
        reason = "" if error is None else cli.one_line(
            error if isinstance(error, cli.CliError) else f"{type(error).__name__}: {error}")
        if error is not None:
            tqdm.write(f"{cli.display(args.jobs)}:{job.line}: failed: {reason}", file=sys.stderr)
        outcomes.append({"line": job.line, "status": "failed" if error else "done", "output": str(output),
                        "reason": reason, "process": state.process_index})
        bar.update(1)

    def edit(loaded: list) -> None:
        rows, images, maps = zip(*loaded)
        try:  # steps, strength and guidance are the same for every row of a batch
            edited, steps_run = module.edit(pipelines, rows[0], images=list(images), maps=list(maps),
                                            prompts=[job.prompt for job in rows], seeds=[job.seed for job in rows],
                                            negative_prompts=[job.negative_prompt for job in rows])
        except Exception as error:  # noqa: BLE001 - one row's failure must not end the batch
            if len(loaded) == 1:
                return record(rows[0], rows[0].output, error)
        else:
            for job, image, map_image, result in zip(rows, images, maps, edited):
                try:
                    job.command = cli.command_line(script, parser, job)  # the row alone, by run.py
                    text = results.png_parameters(job, steps_run, {**args.extra_params, "line": job.line})
                    job.output.parent.mkdir(parents=True, exist_ok=True)
                    written = results.write_png(result, job.output, text, overwrite=args.overwrite)
                    if args.compare:
                        strip = results.compare_strip(image, map_image, result, invert_map=job.invert_map)
                        results.write_png(strip, cli.compare_path(written), text, overwrite=args.overwrite)
                    record(job, written)
                except Exception as error:  # noqa: BLE001
                    record(job, job.output, error)
            return
        gc.collect()  # only now, outside the except clause, is the failed call's memory unreferenced
        torch.cuda.empty_cache()
        for item in loaded:  # to find the row at fault, or get through a batch too large for memory
            edit([item])

    def edit_video(job) -> None:  # one row of a video family: its video, its maps, one call, an mp4
        try:
            frames, source_fps = module.load_video(job)
            maps, fps = module.load_maps(job, frames), module.frame_rate(job, source_fps)
            edited, steps_run = module.edit(pipelines, job, video=frames, maps=maps, prompt=job.prompt,
                                            negative_prompt=job.negative_prompt, seed=job.seed)
            job.command = cli.command_line(script, parser, job)  # the row alone, by run.py
            text = module.parameters(job, steps_run, fps, {**args.extra_params, "line": job.line})
            job.output.parent.mkdir(parents=True, exist_ok=True)
            written, _ = module.write_video(edited, job, video=frames, maps=maps, fps=fps, text=text)
        except Exception as error:  # noqa: BLE001 - one row's failure must not end the batch
            return record(job, job.output, error)
        record(job, written)

    with tqdm(total=sum(map(len, batches)), desc="rows", unit="row", disable=not state.is_main_process,
              file=sys.stderr) as bar:
        for batch in batches:
            if args.video_family:
                for job in batch:
                    edit_video(job)
                continue
            by_size: dict[tuple, list] = {}  # a photo's EXIF orientation may turn the size its header gave
            for job in batch:
                try:
                    image, map_image = cli.load_inputs(job)
                    by_size.setdefault(image.size, []).append((job, image, map_image))
                except Exception as error:  # noqa: BLE001
                    record(job, job.output, error)
            for loaded in by_size.values():
                edit(loaded)


def finish(state, args, plan, outcomes: list[dict], seconds: float, interrupted: bool = False) -> int:
    """Writes summary.json and prints its line; after Ctrl-C it holds only the main process's rows."""
    if not interrupted:
        from accelerate.utils import gather_object
        outcomes = gather_object(outcomes)  # every process's rows
    if not state.is_main_process:
        return 0
    rows = sorted([*outcomes, *({"line": job.line, "status": "skipped", "output": str(job.output), "reason":
                                "its output already holds this edit", "process": 0} for job in plan.skipped),
                   *({"line": line, "status": "bad", "output": "", "reason": "; ".join(problems), "process": 0}
                     for line, problems in plan.bad)], key=lambda row: row["line"])
    count = {status: sum(row["status"] == status for row in rows) for status in ("done", "skipped", "failed", "bad")}
    summary = {"jobs": str(args.jobs), "family": args.family, "model": args.model, "output_dir":
               str(args.output_dir.absolute()), "processes": state.num_processes, "rows": plan.rows, **count,
               "interrupted": interrupted, "seconds": round(seconds, 3), "results": rows}
    text = json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
    path, data = args.output_dir / SUMMARY_NAME, text.encode()
    try:
        results.write_atomically(path, lambda file: file.write(data), overwrite=True)
    except cli.CliError:  # no room for a new file (a full disk): write into the room that summary_room held
        if (room := path.stat().st_size if path.exists() else 0) < len(data):
            raise
        with open(path, "r+b") as file:  # overwriting takes no more of the disk
            file.write(data.ljust(room))
    print(f"{count['done']} done, {count['skipped']} skipped (already done), {count['failed']} failed"
          + (f", {count['bad']} bad" if count["bad"] else "") + f" of {plan.rows} rows in {seconds:.1f}s"
          + ("; interrupted" if interrupted else "") + f"; summary: {cli.display(path)}")
    return cli.EXIT_RUN_FAILED if count["failed"] else 0


if __name__ == "__main__":
    cli.main(run)
