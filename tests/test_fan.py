"""tools/fan.py and the Strength Fan map: the map's sectors, the sweep against stock img2img, both commands."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, make_scheduler, test_image
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from tools import cli, fan, loading, maps
from tools.maps import fan_strengths, strength_fan

STEPS = 5


# ---------------------------------------------------------------------------------------------------------------
# The fan's map


def clockwise_sector(width, height, sectors):
    """Each pixel's sector, recomputed from its angle counterclockwise from 3 o'clock, and where it is unambiguous."""
    y, x = np.mgrid[0:height, 0:width]
    dx, dy_up = x - (width - 1) / 2, (height - 1) / 2 - y
    clockwise_from_noon = (90 - np.degrees(np.arctan2(dy_up, dx))) % 360
    position = clockwise_from_noon / (360 / sectors)
    clear = (np.abs(position - np.round(position)) > 0.01) & ((dx != 0) | (dy_up != 0))  # off every border
    return np.floor(position).astype(int) % sectors, clear


@pytest.mark.parametrize("sectors", [2, 3, 8, 12])
@pytest.mark.parametrize("width, height", [(64, 64), (65, 47)])
def test_fan_map_has_n_sectors_whose_strengths_are_their_labels(sectors, width, height):
    keep_map = strength_fan(width, height, sectors)
    assert keep_map.shape == (height, width) and keep_map.dtype == np.float32
    assert len(np.unique(keep_map)) == sectors
    sector, clear = clockwise_sector(width, height, sectors)
    labels = [f"{strength:.2f}" for strength in fan_strengths(sectors)]
    for k, label in enumerate(labels):
        in_sector = keep_map[clear & (sector == k)]
        assert in_sector.size > 0
        assert np.all(in_sector == np.float32(1 - float(label))), (k, label)  # strength = 1 - keep = the label


def test_fan_starts_kept_right_of_noon_ends_changed_left_of_it_and_its_strengths_are_their_two_decimal_labels():
    keep_map = strength_fan(64, 64, 8)
    assert keep_map[0, 36] == 1.0 and keep_map[0, 27] == 0.0
    assert fan_strengths(8) == [0.0, 0.14, 0.29, 0.43, 0.57, 0.71, 0.86, 1.0]
    for sectors in range(2, maps.MAX_FAN_SECTORS + 1):
        strengths = fan_strengths(sectors)
        assert strengths[0] == 0 and strengths[-1] == 1 and len(strengths) == sectors
        assert all(a < b for a, b in zip(strengths, strengths[1:]))
        assert all(float(f"{s:.2f}") == s for s in strengths)


@pytest.mark.parametrize("sectors", [1, 101, 2.5, True, "8"])
def test_fan_rejects_bad_sector_counts(sectors):
    with pytest.raises(ValueError, match="sectors"):
        strength_fan(16, 16, sectors)


def test_maps_command_draws_the_fan(tmp_path, capsys):
    maps.run(["fan", "--width", "40", "--height", "30", "--sectors", "5", "--output", str(tmp_path / "f.png")])
    with Image.open(tmp_path / "f.png") as written:
        assert np.array_equal(np.asarray(written), np.rint(strength_fan(40, 30, 5) * 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Any family with a run.py plugs in


FAKE_RUN_PY = '''
calls = []

def build_parser():
    from tools import cli
    return cli.build_parser("fake", default_model="someone/model", default_steps=3, default_guidance=1.0)

def load_pipelines(args):
    return "pipelines"

def edit(pipelines, args, *, images, maps, prompts, negative_prompts, seeds):
    calls.append(dict(images=images, maps=maps, prompts=prompts, negative_prompts=negative_prompts, seeds=seeds))
    return list(images), 3
'''


@pytest.fixture
def fake_family(tmp_path):
    folder = tmp_path / "repo" / "Fake"
    folder.mkdir(parents=True)
    (folder / "run.py").write_text(FAKE_RUN_PY)
    (tmp_path / "repo" / "NoRun").mkdir()
    return loading.load_family("fake", root=tmp_path / "repo")


def test_families_are_the_folders_with_a_run_py(tmp_path, fake_family):
    assert list(loading.families(tmp_path / "repo")) == ["fake"]  # the real folders: tests/test_run_contract.py
    assert loading.load_family("FAKE", root=tmp_path / "repo") is fake_family


def test_sweep_is_one_batch_of_identical_images_uniform_maps_and_one_seed_and_fan_one_edit_with_its_map(fake_family):
    args = cli.parse_args(fake_family.build_parser(), ["--prompt", "p", "--seed", "9", "--negative-prompt", "n"])
    image = test_image(size=32)
    strengths = (0.0, 0.3, 1.0)
    outputs, steps_run = fan.sweep_edit(fake_family, "pipelines", args, image, strengths)
    (call,) = fake_family.calls
    assert call["images"] == [image] * 3 and call["seeds"] == [9] * 3
    assert call["prompts"] == ["p"] * 3 and call["negative_prompts"] == ["n"] * 3
    for keep_map, strength in zip(call["maps"], strengths):
        assert keep_map.mode == "F" and keep_map.size == image.size
        assert np.all(np.asarray(keep_map) == np.float32(1 - strength))
    assert len(outputs) == 3 and steps_run == 3
    # The fan is one edit with the fan map.
    image = test_image(size=48)
    output, fan_map, _ = fan.fan_edit(fake_family, "pipelines", args, image, sectors=6)
    _, call = fake_family.calls  # one call more: one edit
    assert call["images"] == [image] and call["seeds"] == [9] and call["maps"] == [fan_map]
    assert np.array_equal(np.asarray(fan_map), strength_fan(48, 48, 6))


# ---------------------------------------------------------------------------------------------------------------
# SD2: the sweep against stock img2img


@pytest.fixture(scope="module")
def sd2():
    return loading.load_family("sd2")


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    test_image().save(path)
    return path


def parse(mode, sd_dir, photo, *extra):
    _, _, args = fan.parse_args([
        "--family", "sd2", mode, "--model", str(sd_dir), "--device", "cpu", "--image", str(photo),
        "--prompt", "a red apple", "--steps", str(STEPS), "--output", str(photo.parent / f"{mode}.png"), *extra,
    ])
    return args


def stock_pipeline(sd_dir, scheduler):
    stock = StableDiffusionImg2ImgPipeline.from_pretrained(sd_dir)
    stock.scheduler = make_scheduler(scheduler)
    stock.set_progress_bar_config(disable=True)
    return stock


def stock_edit(stock, args, image, strength, batch_size):
    result = stock(
        [args.prompt] * batch_size, negative_prompt=[args.negative_prompt] * batch_size, image=[image] * batch_size,
        strength=strength, num_inference_steps=STEPS, guidance_scale=args.guidance_scale,
        generator=[loading.make_generator(args.seed) for _ in range(batch_size)],
    )
    return [np.asarray(item) for item in result.images]


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_sweep_items_equal_stock_img2img_at_their_strengths(sd_dir, sd2, photo, scheduler):
    args = parse("sweep", sd_dir, photo, "--scheduler", scheduler, "--strengths", "0,0.4,1", "--seed", "3")
    image, _ = cli.load_inputs(args)
    pipe = sd2.load_pipelines(args)
    assert fan.stateful_schedulers(pipe) == []
    items, steps_run = fan.sweep_edit(sd2, pipe, args, image, args.strengths)
    assert steps_run == STEPS and len(items) == 3
    stock = stock_pipeline(sd_dir, scheduler)
    for index, strength in enumerate(args.strengths[1:], start=1):
        # Bit for bit against stock on a batch of the same size: the same computation, row for row.
        assert np.array_equal(np.asarray(items[index]), stock_edit(stock, args, image, strength, 3)[index])
        # Against stock run alone, the batch's float rounding may move a pixel by one level.
        alone = stock_edit(stock, args, image, strength, 1)[0]
        assert np.abs(np.asarray(items[index]).astype(int) - alone).max() <= 1
    # Strength 0 runs no step on its item: it is the original's VAE round trip, x0 decoded.
    assert np.abs(np.asarray(items[0]).astype(int) - vae_round_trip(stock, image, args.seed)).max() <= 1


def vae_round_trip(pipe, image, seed):
    """x0 drawn as img2img draws it (the VAE's sample, from the seed's generator first), decoded to uint8 pixels."""
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image)
        x0 = pipe.vae.encode(pixels).latent_dist.sample(loading.make_generator(seed))
        decoded = pipe.vae.decode(x0).sample
    return np.asarray(pipe.image_processor.postprocess(decoded, output_type="pil")[0]).astype(int)


def test_sweep_at_strength_0_with_keep_exact_is_the_input_itself(sd_dir, sd2, photo):
    args = parse("sweep", sd_dir, photo, "--scheduler", "ddim", "--strengths", "0,1", "--keep-exact")
    image, _ = cli.load_inputs(args)
    items, _ = fan.sweep_edit(sd2, sd2.load_pipelines(args), args, image, args.strengths)
    assert np.array_equal(np.asarray(items[0]), np.asarray(image))
    assert not np.array_equal(np.asarray(items[1]), np.asarray(image))


def test_fan_runs_all_strengths_in_one_generation(sd_dir, sd2, photo):
    args = parse("fan", sd_dir, photo, "--scheduler", "ddim", "--sectors", "4")
    image, _ = cli.load_inputs(args)
    pipe = sd2.load_pipelines(args)
    unet_calls = []
    pipe.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    output, _, steps_run = fan.fan_edit(sd2, pipe, args, image, args.sectors)
    assert steps_run == STEPS and len(unet_calls) == STEPS  # one run of the schedule, guidance in the same call
    assert output.size == image.size


def test_multistep_solvers_are_named_for_the_warning(sd_dir):
    stock = stock_pipeline(sd_dir, "dpm++")
    assert fan.stateful_schedulers(stock) == ["DPMSolverMultistepScheduler"]
    assert fan.stateful_schedulers({"base": stock, "other": None}) == ["DPMSolverMultistepScheduler"]
    stock.scheduler = make_scheduler("euler")
    assert fan.stateful_schedulers((stock,)) == []


# ---------------------------------------------------------------------------------------------------------------
# The commands


def run_tool(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "tools.fan", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_fan_command_writes_the_output_and_a_labelled_copy(sd_dir, photo, tmp_path):
    result = run_tool("--family", "sd2", "fan", "--model", sd_dir, "--device", "cpu", "--image", photo,
                      "--prompt", "a red apple", "--steps", "4", "--sectors", "4", "--keep-exact", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("fan.png (")
    assert "4 denoising steps); labelled: fan-labelled.png" in result.stdout
    with Image.open(tmp_path / "fan.png") as raw, Image.open(tmp_path / "fan-labelled.png") as labelled:
        edited, marked, text = np.asarray(raw.convert("RGB")), np.asarray(labelled.convert("RGB")), dict(raw.text)
    assert (text["tool"], text["sectors"], text["map"]) == ("fan", "4", "strength fan, 4 sectors")
    assert text["command"].startswith("python -m tools.fan --family sd2 fan")
    original = np.asarray(test_image())
    kept = strength_fan(64, 64, 4) == 1  # sector 0, strength 0: with --keep-exact, the input's own bytes
    assert np.array_equal(edited[kept], original[kept])
    changed = strength_fan(64, 64, 4) == 0
    assert np.abs(edited[changed].astype(int) - original[changed]).mean() > 5
    assert edited.shape == marked.shape and not np.array_equal(edited, marked)

    again = run_tool("--family", "sd2", "fan", "--model", sd_dir, "--device", "cpu", "--image", photo,
                     "--prompt", "x", "--steps", "2", "--sectors", "4", "--output", "fan.png", cwd=tmp_path)
    assert again.returncode == 2 and "fan.png already exists" in again.stderr
    with Image.open(tmp_path / "fan.png") as raw:
        assert np.array_equal(np.asarray(raw.convert("RGB")), edited)


def test_sweep_command_writes_a_labelled_grid_and_fans_default_output_skips_a_taken_labelled_copy(
        sd_dir, photo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # run in this process: the subprocess route is the fan's test above
    (tmp_path / "fan-labelled.png").write_bytes(b"the user's file")
    _, _, args = fan.parse_args(["--family", "sd2", "fan", "--model", str(sd_dir), "--device", "cpu",
                                 "--image", str(photo), "--prompt", "x"])
    assert args.output == Path("fan-1.png")
    code, out, err = run_main(["--family", "sd2", "sweep", "--model", str(sd_dir), "--device", "cpu", "--image",
                               str(photo), "--prompt", "a red apple", "--steps", "4", "--strengths", "0,0.5,1",
                               "--columns", "2", "--scheduler", "dpm++"], capsys)
    assert code == 0, err
    assert "warning: DPMSolverMultistepScheduler" in err
    assert out.strip().splitlines()[-1].startswith("sweep.png (")
    with Image.open(tmp_path / "sweep.png") as grid:
        assert grid.size == (2 * 64 + fan.GRID_GAP, 2 * 64 + fan.GRID_GAP)
        assert (grid.text["tool"], grid.text["strengths"], grid.text["map"]) == ("sweep", "0,0.5,1", "uniform")


@pytest.mark.parametrize("argv, expected", [
    (["--family", "sd2", "fan", "--seed", "3"], ("sd2", "fan", ["--seed", "3"])),
    (["--family=SD2", "sweep"], ("SD2", "sweep", [])),
    (["sweep", "--seed", "3", "--family", "sd2", "--steps", "4"], ("sd2", "sweep", ["--seed", "3", "--steps", "4"])),
    (["--help"], (None, None, ["--help"])),
])
def test_command_line_splits_into_family_mode_and_run_py_flags(argv, expected):
    assert fan.split_command_line(argv) == expected


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fan.main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


BAD_COMMANDS = {
    "no family": (["fan"], ["usage:"]),
    "no mode": (["--family", "sd2"], ["usage:"]),
    "unknown mode": (["--family", "sd2", "spiral"], ["'spiral'", "fan or sweep"]),
    "unknown family": (["--family", "sd9", "fan"], ["--family sd9", "sd2"]),
    "a map": (["--family", "sd2", "fan", "--map", "{photo}"], ["--map does not apply to fan"]),
    "a mask": (["--family", "sd2", "sweep", "--mask", "{photo}"], ["--mask does not apply to sweep"]),
    "inverted": (["--family", "sd2", "fan", "--invert-map"], ["--invert-map does not apply"]),
    "a strength": (["--family", "sd2", "sweep", "--strength", "0.5"], ["--strength does not apply"]),
    "compare a sweep": (["--family", "sd2", "sweep", "--compare"], ["--compare does not apply to sweep"]),
    "strength above 1": (["--family", "sd2", "sweep", "--strengths", "0,1.5"], ["--strengths", "'1.5'"]),
    "no strengths": (["--family", "sd2", "sweep", "--strengths", ","], ["--strengths", "1 to 64"]),
    "one sector": (["--family", "sd2", "fan", "--sectors", "1"], ["--sectors", "from 2 to 100"]),
    "labelled copy taken": (["--family", "sd2", "fan", "--output", "mine.png"], ["mine-labelled.png", "--overwrite"]),
}


@pytest.mark.parametrize("argv, fragments", BAD_COMMANDS.values(), ids=BAD_COMMANDS.keys())
def test_bad_commands_give_one_line(tmp_path, photo, monkeypatch, capsys, argv, fragments):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine-labelled.png").write_bytes(b"the user's file")
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    argv = [token.format(photo=photo) for token in argv] + ["--device", "cpu"] * (len(argv) > 2)
    code, out, err = run_main(argv, capsys)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


def test_help_names_the_modes_and_the_scheduler_caveat(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0 and "fan" in out and "sweep" in out and "DDIM" in out
    code, out, _ = run_main(["--family", "sd2", "sweep", "--help"], capsys)
    assert code == 0 and "--strengths" in out and "--scheduler ddim or euler" in out and "--model" in out
