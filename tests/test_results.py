"""What a run leaves behind: PNGs whose recorded command makes them again, and no stray file of its own."""

import json
import shlex

import numpy as np
import pytest
from conftest import run_in_process
from diffusers import UNet2DConditionModel
from PIL import Image

from tests.tiny_models import tiny_controlnet
from tools import cli, batch, loading, results


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), dict(image.text)


def rerun(text, output, cwd):
    """The PNG text's command, run again into ``output``."""
    words = shlex.split(text["command"])
    ran = run_in_process(words[1], *words[2:], "--output", output, cwd=cwd)
    assert ran.returncode == 0, ran.stderr
    return pixels(output)[0]


def test_the_command_in_a_png_of_run_py_and_of_batch_makes_the_same_pixels(sd_dir, inputs, tmp_path):
    controlnet = tmp_path / "controlnet"
    tiny_controlnet(UNet2DConditionModel.from_pretrained(sd_dir / "unet")).save_pretrained(controlnet)
    flags = ["--model", sd_dir, "--controlnet", controlnet, "--control", "canny", "--crop-margin", "4", "--device",
             "cpu", "--steps", "3", "--negative-prompt=-blurry"]  # a value like a flag must survive the quoting
    image, map_path = inputs
    ran = run_in_process("SD2/run.py", *flags, "--image", image.name, "--map", map_path.name, "--prompt", "a pear",
                         "--seed", "5", "--output", "edit.png", cwd=tmp_path)  # paths relative to the folder
    assert ran.returncode == 0, ran.stderr
    edited, text = pixels(tmp_path / "edit.png")
    assert np.array_equal(rerun(text, tmp_path / "again.png", tmp_path), edited)
    (tmp_path / "jobs.csv").write_text(f"image,map,prompt,seed\n{image.name},{map_path.name},a pear,5\n")
    assert batch.run(["--family", "sd2", str(tmp_path / "jobs.csv"), "--output-dir", str(tmp_path / "out"),
                      *map(str, flags)]) == 0
    row, row_text = pixels(tmp_path / "out" / "0001-photo.png")
    assert np.array_equal(rerun(row_text, tmp_path / "row-again.png", tmp_path), row)
    # list-valued flags in one format, whoever wrote them
    assert text["controlnet"] == row_text["controlnet"] == json.dumps([str(controlnet)])


def test_batch_refuses_crop_upscale_without_crop_margin_as_run_py_does():
    with pytest.raises(cli.CliError, match="--crop-upscale scales the crop that --crop-margin makes; pass --crop-marg"):
        batch.parse_args(loading.load_family("sd2"),
                         ["--family", "sd2", "x.csv", "--output-dir", "o", "--crop-upscale"])


def test_a_write_removes_the_partial_files_that_killed_writes_left_in_its_folder(tmp_path):
    dead, live = tmp_path / ".edit.png.99999999.partial", tmp_path / ".edit.png.1.partial"  # no process 99999999
    for path in (dead, live):
        path.write_bytes(b"half a PNG")
    results.write_png(Image.new("RGB", (4, 4)), tmp_path / "other.png")
    assert sorted(path.name for path in tmp_path.iterdir()) == [live.name, "other.png"]


def test_a_batch_leaves_no_lock_nor_empty_folder_and_a_summary_on_a_full_disk(sd_dir, inputs, tmp_path, monkeypatch):
    (tmp_path / "jobs.csv").write_text("image,map,prompt\nphoto.png,map.png,a pear\n")
    (tmp_path / "sdxl").mkdir()  # a checkpoint of another family
    (tmp_path / "sdxl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLImg2ImgPipeline"}')
    argv = ["--family", "sd2", str(tmp_path / "jobs.csv"), "--device", "cpu", "--steps", "2", "--output-dir"]
    with pytest.raises(cli.CliError, match="for SDXL/run.py"):
        batch.run([*argv, str(tmp_path / "refused"), "--model", str(tmp_path / "sdxl")])
    assert not (tmp_path / "refused").exists()

    def full_disk(path, write, overwrite=False):
        raise cli.CliError(f"cannot write {path.name}: [Errno 28] No space left on device", cli.EXIT_RUN_FAILED)
    monkeypatch.setattr(results, "write_atomically", full_disk)
    assert batch.run([*argv, str(tmp_path / "out"), "--model", str(sd_dir)]) == cli.EXIT_RUN_FAILED
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["summary.json"]  # and no .batch.lock
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failed"] == 1 and "No space left" in summary["results"][0]["reason"]


def test_a_compare_strip_that_cannot_be_written_says_the_output_was(inputs, tmp_path, monkeypatch):
    image, map_path = (Image.open(path) for path in inputs)
    parser = cli.build_parser("", default_model="m", default_steps=1, default_guidance=1)
    args = cli.parse_args(parser, [*(f"--{flag}={path}" for flag, path in zip(["image", "map"], inputs)),
                                   "--output", str(tmp_path / "edit.png"), "--compare"])
    monkeypatch.setattr(cli, "compare_path", lambda output: tmp_path / "full" / "edit-compare.png")
    with pytest.raises(cli.CliError, match=r"^wrote .*edit.png, but not its comparison strip: cannot write .* rerun "
                       "with --overwrite once there is room"):
        results.save_result(image, args, image=image, map_image=map_path, steps_run=1, seconds=1)
