"""Side-by-side measurement for the benchmarks: interleaved runs, medians, peak memory and UNet-call counts.

Absolute times on a shared machine are noisy, so every benchmark compares cases measured in the same process,
alternating between them, and reports ratios.
"""

import os
import statistics
import threading
import time

import torch


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


class UNetCalls:
    """Counts forward calls of a denoiser module; `remove()` takes the counting hook off again."""

    def __init__(self, module):
        self.count = 0
        self._hook = module.register_forward_hook(self._count)

    def _count(self, *_):
        self.count += 1

    def remove(self):
        self._hook.remove()


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def compare(cases: dict, repeats: int, device="cpu", warmup: int = 1) -> dict:
    """Runs every case `warmup` times, then `repeats` rounds in alternation; returns median seconds and peak bytes.

    `cases` maps a name to a function of no arguments. Every other round runs the cases in reverse order, so that
    load that rises or falls during a round on a shared machine does not always land on the same case.
    Each result holds "seconds" (wall clock), "cpu_seconds" (CPU time of this process, which other processes on a
    shared CPU disturb far less), "peak_bytes" (the highest rise above the level at the start of a run) and
    "total_peak_bytes" (the highest level itself).
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


def mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"
