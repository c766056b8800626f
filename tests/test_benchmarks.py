"""The CPU benchmarks (benchmarks/bench_*.py) run, on their smallest settings, and count the UNet calls they should.

They are run by hand for their figures; this keeps them working in between, as --smoke does for gpu_bench.py.
"""

import importlib
import math

import pytest
import torch

from benchmarks import harness

STEPS = 5
SMALLEST = {
    "bench_sd2": ["--size", "32"],
    "bench_sdxl": ["--size", "32"],
    "bench_kandinsky": ["--size", "32"],
    "bench_if": ["--size", "16", "--stage2-size", "32", "--stage2-steps", str(STEPS)],
}


def table_rows(output):
    """(case, UNet calls) for every row of the tables in a benchmark's output."""
    return [
        (case, int(line[len(case) :].split()[0]))
        for line in output.splitlines()
        for case in harness.CASES.values()
        if line.startswith(case + " ")
    ]


@pytest.mark.parametrize("script", SMALLEST)
def test_bench_runs_every_case_and_counts_its_unet_calls(script, monkeypatch, capsys):
    monkeypatch.setattr(harness, "quiet_libraries", lambda: None)  # leave the libraries' logging to the other tests
    importlib.import_module(f"benchmarks.{script}").main([*SMALLEST[script], "--steps", str(STEPS), "--repeats", "1"])
    output = capsys.readouterr().out
    rows = dict(table_rows(output))
    stages = 2 if script == "bench_if" else 1
    assert len(table_rows(output)) == len(harness.CASES) * stages
    assert rows[harness.CASES["stock"]] == rows[harness.CASES["ours"]] == STEPS
    assert rows[harness.CASES["ours_weak"]] == math.floor(STEPS * harness.WEAK_STRENGTH)
    assert output.count("differential work, gradient map: map preparation ") == stages


def test_weak_map_has_a_cell_of_full_weak_strength_on_every_grid():
    # Area averaging onto the latent grid must keep the strongest cell at exactly 0.3, or fewer steps run.
    weak = harness.keep_maps(64)["ours_weak"]
    for grid in (64, 16, 8):
        cells = torch.nn.functional.interpolate(torch.from_numpy(weak)[None, None], size=(grid, grid), mode="area")
        assert 1 - cells.min().item() == pytest.approx(harness.WEAK_STRENGTH, abs=1e-6)
        assert cells.max().item() == 1  # and pixels that never change


def test_unet_calls_count_forward_calls_until_stopped():
    unet = torch.nn.Linear(2, 2)
    calls = harness.count_unet_calls(unet)
    unet(torch.zeros(2))
    unet(torch.zeros(2))
    calls.stop()
    unet(torch.zeros(2))
    assert len(calls) == 2
