"""What every benchmark shares: the cases, interleaved timing, model-call counts, the table, and the differential work.

Absolute times on a shared machine are noisy, so every benchmark compares cases measured in the same process,
alternating between them, and reports ratios. The first case of a comparison is the baseline ("stock").
"""

import argparse
import os
import statistics
import threading
import time

import diffusers
import numpy as np
import torch
import transformers

SEED = 0
WEAK_STRENGTH = 0.3  # the strongest pixel of the "weak" map

CASES = {  # key (as in JSON reports): what is run
    "stock": "stock img2img, strength 1",
    "ours": "ours, uniform map, strength 1",
    "ours_gradient": "ours, gradient map 0..1",
    "ours_weak": f"ours, strongest pixel {WEAK_STRENGTH}",
}


# ---------------------------------------------------------------------------------------------------------------
# Counting and timing
# ---------------------------------------------------------------------------------------------------------------


class UNetCalls(list):
    """One entry per forward call of a denoising model (a UNet, or a flow family's transformer), from creation until
    `stop()`: `len(calls)` counts them.

    A list, so that a test can assert `calls == []`.
    """

    def __init__(self, unet):
        super().__init__()
        self._hook = unet.register_forward_hook(lambda *_: self.append(1))

    def stop(self):
        self._hook.remove()


def denoiser(model):
    """The model that runs once per denoising step: a pipeline's UNet or transformer, or `model` itself."""
    for name in ("unet", "transformer"):
        if getattr(model, name, None) is not None:
            return getattr(model, name)
    return model


def count_unet_calls(model) -> UNetCalls:
    """Starts counting the calls of a pipeline's denoiser (UNet or transformer), or of `model` itself."""
    return UNetCalls(denoiser(model))


def resident_bytes() -> int:
    """The process's resident memory, from /proc (Linux); 0 where that is not available."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocations on a GPU, resident memory sampled every ms on a CPU.

    `peak` is the rise above the level at entry (activations and anything loaded during the run); `total_peak` is
    the highest level itself (weights already in place included).
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = self.total_peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start, self.highest, self.running = resident_bytes(), resident_bytes(), True
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self):
        while self.running:
            self.highest = max(self.highest, resident_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.total_peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.sampler.join()
            self.total_peak = max(self.highest, resident_bytes())
        self.peak = self.total_peak - self.start


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def clock(device) -> str:
    """The time that ratios compare: on a CPU the process's CPU time, which other processes on a shared machine
    disturb far less than wall time; on a GPU wall time, since the CPU mostly waits."""
    return "cpu_seconds" if torch.device(device).type == "cpu" else "seconds"


def compare(cases: dict, repeats: int, device="cpu", warmup: int = 1) -> dict:
    """Runs every case `warmup` times, then `repeats` rounds in alternation; returns median seconds and peak bytes.

    `cases` maps a name to a function of no arguments. Every other round runs the cases in reverse order, so that
    load that rises or falls during a round on a shared machine does not always land on the same case.
    Each result holds "seconds" (wall clock), "cpu_seconds" (CPU time of this process), "peak_bytes" (the highest
    rise above the level at the start of a run) and "total_peak_bytes" (the highest level itself).
    """
    for run in cases.values():
        for _ in range(warmup):
            run()
    seconds = {name: [] for name in cases}
    cpu_seconds = {name: [] for name in cases}
    peaks = {name: 0 for name in cases}
    total_peaks = {name: 0 for name in cases}
    in_order = list(cases.items())
    for round_number in range(repeats):
        for name, run in in_order if round_number % 2 == 0 else in_order[::-1]:
            synchronize(device)
            with PeakMemory(device) as memory:
                started, cpu_started = time.perf_counter(), time.process_time()
                run()
                synchronize(device)
                seconds[name].append(time.perf_counter() - started)
                cpu_seconds[name].append(time.process_time() - cpu_started)
            peaks[name] = max(peaks[name], memory.peak)
            total_peaks[name] = max(total_peaks[name], memory.total_peak)
    return {
        name: {"seconds": statistics.median(seconds[name]), "cpu_seconds": statistics.median(cpu_seconds[name]),
               "peak_bytes": peaks[name], "total_peak_bytes": total_peaks[name]}
        for name in cases
    }


def unet_calls_per_case(model, cases: dict) -> dict:
    """Runs each case once, counting the calls of `model` (a pipeline's denoiser, see `count_unet_calls`); this run
    also warms the case up."""
    counts = {}
    for name, run in cases.items():
        calls = count_unet_calls(model)
        try:
            run()
        finally:
            calls.stop()
        counts[name] = len(calls)
    return counts


def side_by_side(cases: dict, unet_calls: dict, repeats: int, device) -> dict:
    """`compare` after the warm-up that counting was, with per-case ratios to the first case on the device's clock:
    "vs_stock" (whole runs) and "step_vs_stock" (time per call of the denoiser)."""
    results = compare(cases, repeats=repeats, device=device, warmup=0)
    measured = clock(device)
    baseline = next(iter(results.values()))[measured]
    baseline_step = baseline / unet_calls[next(iter(results))]
    for name, result in results.items():
        result["unet_calls"] = unet_calls[name]
        result["steps_per_second"] = unet_calls[name] / result[measured] if unet_calls[name] else 0.0
        result["vs_stock"] = result[measured] / baseline
        result["step_vs_stock"] = result[measured] / unet_calls[name] / baseline_step if unet_calls[name] else None
    return results


class Stopwatch:
    """Adds up the time spent in the functions it wraps, on the device's clock."""

    def __init__(self, device):
        self.device, self.seconds, self.calls, self.running = device, 0.0, 0, False
        self.now = time.process_time if clock(device) == "cpu_seconds" else time.perf_counter

    def wrap(self, function):
        def timed(*args, **kwargs):
            if self.running:  # called by another wrapped function, whose time already holds this call's
                return function(*args, **kwargs)
            synchronize(self.device)
            started, self.running = self.now(), True
            try:
                return function(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.seconds += self.now() - started
                self.calls += 1
                self.running = False

        return timed


def differential_work(module, run, device) -> tuple:
    """Seconds of map preparation in `run()`, one call of a pipeline from `module` (a pipeline file), seconds of
    blending per step, and the bytes that the blend holds through the loop (x0, noise and release steps): the
    differential core's own work, timed where it runs. Whole-run ratios drown it in noise. A video file's map
    preparation includes its frame axis (`video_map_to_tensor`, `map_on_latent_frames`).
    """
    preparation, blend, held = Stopwatch(device), Stopwatch(device), []
    preparing = [name for name in ("map_to_tensor", "video_map_to_tensor", "map_on_grid", "map_on_latent_frames",
                                   "release_steps") if hasattr(module, name)]
    frozen_pixels = module.FrozenPixels
    saved_functions, saved_blend = {name: getattr(module, name) for name in preparing}, frozen_pixels.blend
    timed_blend = blend.wrap(saved_blend)

    def noting_blend(frozen, *args, **kwargs):
        if not held:  # storage, not shape: an expanded release step holds only what it expands
            held.append(sum(tensor.untyped_storage().nbytes()
                            for tensor in (frozen.x0, frozen.noise, frozen.release_step)))
        return timed_blend(frozen, *args, **kwargs)

    for name, function in saved_functions.items():
        setattr(module, name, preparation.wrap(function))
    frozen_pixels.blend = noting_blend
    try:
        run()
    finally:
        for name, function in saved_functions.items():
            setattr(module, name, function)
        frozen_pixels.blend = saved_blend
    return preparation.seconds, blend.seconds / max(blend.calls, 1), sum(held)


# ---------------------------------------------------------------------------------------------------------------
# Inputs and cases
# ---------------------------------------------------------------------------------------------------------------


def keep_maps(size) -> dict:
    """Keep-maps (white = keep) at the output size (a side, or (height, width)), by case: all black (strength 1
    everywhere), a gradient (strength 1 at the left edge to 0 at the right, so the blend has work at every step), and
    a weak map.

    The weak map has strength WEAK_STRENGTH on its left quarter, falls linearly to 0 across the middle half and keeps
    the right quarter, so that pixels are released at every step from the first one run and some never are. The
    plateau is wider than a latent cell: the map is area-averaged down to the latent grid, and a bare ramp would
    leave no cell at the full WEAK_STRENGTH.
    """
    height, width = size if isinstance(size, tuple) else (size, size)
    x = (np.arange(width) + 0.5) / width
    weak_strength = np.clip(WEAK_STRENGTH * (0.75 - x) / 0.5, 0, WEAK_STRENGTH)
    row = {"ours": np.zeros(width), "ours_gradient": x, "ours_weak": 1 - weak_strength}
    return {case: np.repeat(keep[None], height, axis=0).astype(np.float32) for case, keep in row.items()}


def embeddings(shape, device, dtype=torch.float32) -> torch.Tensor:
    """Random text or image embeddings, the same for every run: they stand in for an encoder that both pipelines
    would run once per call, outside the denoising loop."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(SEED)).to(device, dtype)


def img2img_cases(stock, ours, size: int, inputs: dict, names=tuple(CASES), before_call=None,
                  stock_inputs: dict | None = None) -> dict:
    """One function of no arguments per case named in `names` (keys of CASES). Each draws from a freshly seeded
    generator, so that every run is the same; `before_call(pipe)`, if given, runs before each call. `stock_inputs`
    go to stock alone (an inpainting pipeline's mask, which ours replaces by the map)."""
    maps = keep_maps(size)

    def call(pipe, **kwargs):
        def run():
            if before_call is not None:
                before_call(pipe)
            return pipe(generator=torch.Generator().manual_seed(SEED), **inputs, **kwargs)

        return run

    cases = {"stock": call(stock, strength=1.0, **(stock_inputs or {}))}
    cases.update({name: call(ours, map=maps[name], strength=1.0) for name in CASES if name != "stock"})
    return {name: cases[name] for name in names}


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def percent_change(ratio) -> str:
    return "-" if ratio is None else f"{ratio - 1:+.1%}"


MEASURED_COLUMNS = [  # heading, width, text of a result
    ("model calls", 11, lambda result: str(result["unet_calls"])),
    ("wall s", 8, lambda result: f"{result['seconds']:.3f}"),
    ("CPU s", 8, lambda result: f"{result['cpu_seconds']:.3f}"),
    ("vs stock", 8, lambda result: f"{result['vs_stock']:.3f}"),
    ("per step", 8, lambda result: percent_change(result["step_vs_stock"])),
    ("peak rise", 10, lambda result: mib(result["peak_bytes"])),
    ("peak total", 10, lambda result: mib(result["total_peak_bytes"])),
]


class Table:
    """The benchmarks' table, printed a row at a time: label columns, then what `side_by_side` measured.

    "model calls" counts calls of the denoiser (UNet or transformer). "vs stock" is the ratio of whole runs; "per
    step" the change in time per such call, which puts a run's fixed
    costs (encoding, decoding) on fewer steps when fewer run.
    """

    def __init__(self, *labels):
        self.labels = labels  # (heading, width) of each label column

    def print_header(self):
        headings = [f"{heading:{width}}" for heading, width in self.labels]
        headings += [f"{heading:>{width}}" for heading, width, _ in MEASURED_COLUMNS]
        print(" ".join(headings), flush=True)

    def print_row(self, *labels, result=None, note=""):
        """One case's result, or a note (a case or variant that did not run, and why) after the labels."""
        cells = [f"{label:{width}}" for label, (_, width) in zip(labels, self.labels)]
        if result is not None:
            cells += [f"{text(result):>{width}}" for _, width, text in MEASURED_COLUMNS]
        print(" ".join(cells + ([note] if note else [])).rstrip(), flush=True)

    def print_results(self, results: dict, *labels):
        for name, result in results.items():
            self.print_row(*labels, CASES.get(name, name), result=result)


def run_description(device, steps, repeats, guidance="CFG on") -> str:
    return (f"T = {steps}, {guidance}, {device}, {torch.get_num_threads()} threads, median of {repeats} alternating "
            f"rounds; ratios of {'CPU' if clock(device) == 'cpu_seconds' else 'wall'} time")


def print_differential_work(module, run, stock: dict, device):
    """Times `differential_work` and prints it beside the time of one stock step (`stock`: its `side_by_side`
    result)."""
    preparation, blend, held = differential_work(module, run, device)
    stock_step = stock[clock(device)] / stock["unet_calls"]
    print(f"differential work, gradient map: map preparation {preparation * 1e3:.2f} ms per call, blend "
          f"{blend * 1e3:.3f} ms per step = {blend / stock_step:.2%} of a stock step; x0, noise and release steps "
          f"held {held / 2**10:.0f} KiB", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def measure_family(title: str, stock, ours, module, inputs: dict, map_size: int, repeats: int, device,
                   extra_cases=None, guidance="CFG on", stock_inputs=None) -> dict:
    """Times the cases of CASES (and `extra_cases`, by display name) for one pair of pipelines sharing a denoiser (UNet
    or transformer), side by side, then prints the table and the differential work of `module`, the pipeline file of
    `ours`. `guidance` says in the heading how the family guides (CFG doubles the batch of every call);
    `stock_inputs` go to stock alone (an inpainting pipeline's mask, which ours replaces by the map)."""
    cases = {**img2img_cases(stock, ours, map_size, inputs, stock_inputs=stock_inputs), **(extra_cases or {})}
    results = side_by_side(cases, unet_calls_per_case(stock, cases), repeats, device)
    print(f"\n{title}, {run_description(device, inputs['num_inference_steps'], repeats, guidance)}")
    table = Table(("case", 36))
    table.print_header()
    table.print_results(results)
    print_differential_work(module, cases["ours_gradient"], results["stock"], device)
    return results


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def multiple_of(multiple: int):
    def size(text: str) -> int:
        value = positive_int(text)
        if value % multiple:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple} for this model, not {value}")
        return value

    return size


def bench_parser(description: str, size: int = 256, multiple: int = 32) -> argparse.ArgumentParser:
    """The flags every family's benchmark takes; a family adds its own. `--size` must be a multiple of `multiple`
    (the models' total downsampling: VAE factor times the UNet's)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=multiple_of(multiple), default=size,
                        help=f"image side in pixels, a multiple of {multiple} (default {size})")
    parser.add_argument("--steps", type=positive_int, default=20, help="num_inference_steps T (default 20)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="alternating timed rounds per case (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    return parser


def quiet_libraries() -> None:
    """Random-weight models trip warnings meant for checkpoints ("modules that should be kept in float32: []"), and
    loading the IF pipelines warns about torchvision; neither says anything about the measurement."""
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
