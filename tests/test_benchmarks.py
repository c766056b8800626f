"""The CPU benchmarks (benchmarks/bench_*.py) run on their smallest settings and count the model calls they should."""

import importlib
import math

import pytest
import torch

from benchmarks import harness

STEPS = 5
SMALLEST = {  # "script [family]": arguments
    "bench_sd2": ["--size", "32"], "bench_sdxl": ["--size", "32"], "bench_kandinsky": ["--size", "32"],
    "bench_if": ["--size", "16", "--stage2-size", "32", "--stage2-steps", str(STEPS)],
    **{f"bench_flow {family}": ["--family", family, "--size", "32"]
       for family in ("sd3", "flux", "chroma", "qwenimage", "zimage", "flux_kontext", "flux_fill",
                                          "qwenimage_edit", "flux2_klein")},
    "bench_wan": ["--size", "32", "--frames", "5"],
}
# Chroma's and Wan's CFG and Qwen-Image's true CFG run the negative prompt as a second transformer call in every step.
CALLS_PER_STEP = {"bench_flow chroma": 2, "bench_flow qwenimage": 2, "bench_flow qwenimage_edit": 2,
                  "bench_flow flux2_klein": 2, "bench_wan": 2}


def table_rows(output):
    """(case, model calls) for every row of the tables in a benchmark's output."""
    return [(case, int(line[len(case) :].split()[0])) for line in output.splitlines() for case in harness.CASES.values()
            if line.startswith(case + " ")]


@pytest.mark.parametrize("bench", SMALLEST)
def test_bench_runs_every_case_and_counts_its_model_calls(bench, monkeypatch, capsys):
    monkeypatch.setattr(harness, "quiet_libraries", lambda: None)  # leave the libraries' logging to the other tests
    script = bench.split()[0]
    importlib.import_module(f"benchmarks.{script}").main([*SMALLEST[bench], "--steps", str(STEPS), "--repeats", "1"])
    output = capsys.readouterr().out
    rows = dict(table_rows(output))
    stages = 2 if script == "bench_if" else 1
    calls_per_step = CALLS_PER_STEP.get(bench, 1)
    # At strength 0.3 (T * s = 1.5) flow-matching img2img runs ceil(1.5) = 2 steps; SD, Kandinsky, IF and Wan
    # video-to-video floor(1.5).
    weak_steps = math.ceil if script == "bench_flow" else math.floor
    assert len(table_rows(output)) == len(harness.CASES) * stages
    assert rows[harness.CASES["stock"]] == rows[harness.CASES["ours"]] == STEPS * calls_per_step
    assert rows[harness.CASES["ours_weak"]] == weak_steps(STEPS * harness.WEAK_STRENGTH) * calls_per_step
    assert output.count("differential work, gradient map: map preparation ") == stages
    if script == "bench_wan":  # each of our cases' peak memory against stock's
        assert output.count(", against stock: rise ") == len(harness.CASES) - 1


def test_weak_map_has_a_cell_of_full_weak_strength_on_every_grid():
    # Area averaging onto the latent grid must keep the strongest cell at exactly 0.3, or fewer steps run.
    weak = harness.keep_maps(64)["ours_weak"]
    for grid in (64, 16, 8):
        cells = torch.nn.functional.interpolate(torch.from_numpy(weak)[None, None], size=(grid, grid), mode="area")
        assert 1 - cells.min().item() == pytest.approx(harness.WEAK_STRENGTH, abs=1e-6)
        assert cells.max().item() == 1  # and pixels that never change


def test_the_counter_counts_forward_calls_of_a_model_or_a_pipelines_unet_or_transformer_until_stopped():
    unet = torch.nn.Linear(2, 2)
    calls = harness.count_unet_calls(unet)
    unet(torch.zeros(2))
    unet(torch.zeros(2))
    calls.stop()
    unet(torch.zeros(2))
    assert len(calls) == 2

    class Pipeline:  # what the counter reads of a diffusers pipeline: its components as attributes
        def __init__(self, **components):
            self.__dict__.update(components)

    unet, transformer = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert harness.denoiser(Pipeline(unet=unet, vae=None)) is unet
    assert harness.denoiser(Pipeline(transformer=transformer, vae=None)) is transformer
    calls = harness.count_unet_calls(Pipeline(transformer=transformer))
    transformer(torch.zeros(2))
    unet(torch.zeros(2))
    assert len(calls) == 1


@pytest.mark.parametrize("area", [0.05, 0.10, 0.25])
def test_the_crop_benchmark_maps_change_the_share_of_the_frame_they_name(area):
    from benchmarks.bench_crop import soft_inpainting_map

    assert (soft_inpainting_map(512, area) < 1).mean() == pytest.approx(area, rel=0.02)


def test_the_crop_benchmark_runs_both_cases_with_the_same_calls_and_fewer_flops_in_the_crop(monkeypatch, capsys):
    from benchmarks import bench_crop

    monkeypatch.setattr(harness, "quiet_libraries", lambda: None)
    bench_crop.main(["--size", "128", "--steps", "2", "--repeats", "1", "--widths", "32,32,32"])  # the narrowest
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().endswith(tuple("0123456789"))
            and "%" in line]
    assert len(rows) == len(bench_crop.AREAS)
    for changed, crop, whole_calls, _, crop_calls, _, flops, _, _ in rows:
        assert whole_calls == crop_calls == "2"
        assert float(changed[:-1]) < float(crop[:-1]) < 100 and float(flops) < 1


def test_the_published_sd_unet_costs_about_the_crops_share_of_the_frame_per_step():
    from benchmarks.bench_crop import AREAS, real_unet_flops

    shares = real_unet_flops(("sd2",))["sd2"]
    assert list(shares) == list(AREAS)
    for area, (flops, crop) in shares.items():
        assert area < crop < 1 and 0.8 < flops / crop < 1.2


def test_bench_caches_computes_every_release_step_and_threshold_0_changes_nothing(monkeypatch, capsys):
    from benchmarks import bench_caches

    monkeypatch.setattr(harness, "quiet_libraries", lambda: None)
    bench_caches.main(["--size", "32", "--steps", str(STEPS), "--repeats", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 2 * 7
    for row in rows:  # ... <computed> of <run> steps <releasing> <max diff> <time>
        computed, run, releasing = int(row[-7]), int(row[-5]), int(row[-3])
        assert run == STEPS and releasing <= computed <= run, row  # every step that releases pixels computes
    assert [row[-2] for row in rows if row[:2] == ["FirstBlockCache", "0"]] == ["0.00e+00"] * 2


@pytest.mark.parametrize("family, flags", [("sd2", ["--repeats", "2"]), ("sdxl", ["--steps", "2", "--repeats", "1"])])
def test_the_app_cpu_benchmark_presses_the_pages_edit_with_its_cpu_start_settings(family, flags, monkeypatch, capsys):
    import app
    from benchmarks import bench_app_cpu
    from tools import loading

    monkeypatch.setattr(harness, "quiet_libraries", lambda: None)
    load_pipelines = loading.load_family(family).load_pipelines
    args = bench_app_cpu.build_parser().parse_args(["--family", family, "--smoke", *flags])
    assert (args.steps, args.side) == ((2, app.CPU_SIDE) if family == "sdxl" else (app.CPU_STEPS, app.CPU_SIDE))
    bench_app_cpu.main(["--family", family, "--smoke", *flags])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith(f"page: {args.steps} steps, working size {app.CPU_SIDE} px")
    size = "1024x1024" if family == "sdxl" else f"{app.CPU_SIDE}x{app.CPU_SIDE}"  # SDXL edits at about 1024² in area
    results = [line for line in lines if line.startswith("Result ")]
    assert len(results) == args.repeats
    calls = args.steps + (family == "sd2")  # SD 2.1 ships PNDM: one UNet call more than its steps
    for number, line in enumerate(results, start=1):  # every step runs: the painted half changes fully
        assert line.startswith(f"Result {number}: {calls} denoising steps run in ") and f"{calls} UNet calls" in line
        assert f" at {size} px" in line
    assert loading.load_family(family).load_pipelines is load_pipelines  # the family's own loader, back in place
