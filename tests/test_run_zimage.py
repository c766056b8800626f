"""ZImage/run.py end to end on a tiny Z-Image model saved to a folder: the runs that look at a real process's stderr in
a subprocess, the others in this process."""

import numpy as np
import pytest
from conftest import COMMON_BAD_INPUTS, assert_refused_in_one_line, run_in_process, run_script
from flow_models2 import save_zimage
from PIL import Image

from tools.maps import save_map

SCRIPT = "ZImage/run.py"



@pytest.fixture(scope="module")
def zimage_dir(tmp_path_factory):
    return save_zimage(tmp_path_factory.mktemp("zimage"))


def test_run_writes_a_png_with_its_parameters(zimage_dir, inputs, tmp_path):
    image, map_path = inputs
    output = tmp_path / "edit.png"
    result = run_script(
        SCRIPT, "--model", zimage_dir, "--device", "cpu", "--image", image, "--map", map_path,
        "--prompt", "a red apple", "--steps", "5", "--strength", "0.5", "--seed", "7", "--output", output, "--compare",
    )
    assert result.returncode == 0, result.stderr
    last_line = result.stdout.strip().splitlines()[-1]
    # T * s = 2.5: flow-matching img2img runs ceil(2.5) steps, where SD runs int(2.5).
    assert last_line.startswith(str(output)) and "3 denoising steps" in last_line
    with Image.open(output) as written:
        assert written.size == (64, 64) and written.format == "PNG"
        text = written.text
    assert text["prompt"] == "a red apple" and text["seed"] == "7" and text["strength"] == "0.5"
    assert text["model"] == str(zimage_dir) and text["map"].endswith("map.png")
    with Image.open(tmp_path / "edit-compare.png") as strip:
        assert strip.width >= 3 * 64


@pytest.mark.parametrize(
    "case, extra, message",
    COMMON_BAD_INPUTS + [
        ("hub model offline", ["--model", "someone/not-cached-model"], "--model PATH"),
        ("an SD sampler", ["--scheduler", "euler"], "leave --scheduler default"),
    ],
)
def test_bad_input_gives_one_line_and_leaves_inputs_untouched(zimage_dir, inputs, tmp_path, case, extra, message):
    image, map_path = inputs
    base = ["--model", zimage_dir, "--device", "cpu", "--image", image, "--map", map_path, "--prompt", "x",
            "--steps", "2"]
    assert_refused_in_one_line(SCRIPT, base, extra, message, inputs, tmp_path)


def test_keep_exact_writes_the_input_bytes_where_the_map_is_white(zimage_dir, inputs, tmp_path):
    image, map_path = inputs  # the left half changes fully, the right half is kept
    output = tmp_path / "exact.png"
    result = run_in_process(SCRIPT, "--model", zimage_dir, "--device", "cpu", "--image", image, "--map", map_path,
                        "--prompt", "a red apple", "--steps", "4", "--keep-exact", "--output", output)
    assert result.returncode == 0, result.stderr
    with Image.open(image) as source, Image.open(output) as written:
        original, edited = np.asarray(source.convert("RGB")), np.asarray(written.convert("RGB"))
    assert np.array_equal(edited[:, 32:], original[:, 32:])
    assert np.abs(edited[:, :32].astype(int) - original[:, :32]).mean() > 5


def test_a_size_off_the_model_grid_is_rounded_down_with_its_map(zimage_dir, tmp_path):
    # 64 x 79 rounds to 64 x 64: Z-Image does not resize to a size it is given, so run.py resizes image and map.
    image, map_path, output = tmp_path / "tall.png", tmp_path / "tall-map.png", tmp_path / "out.png"
    Image.fromarray(np.full((79, 64, 3), 128, np.uint8)).save(image)
    save_map(np.zeros((79, 64), np.float32), map_path)
    result = run_in_process(SCRIPT, "--model", zimage_dir, "--device", "cpu", "--image", image, "--map", map_path,
                        "--prompt", "x", "--steps", "2", "--output", output)
    assert result.returncode == 0, result.stderr
    with Image.open(output) as written:
        assert written.size == (64, 64)


def test_help_names_the_default_model_and_guidance():
    result = run_in_process(SCRIPT, "--help")
    assert result.returncode == 0
    assert "Tongyi-MAI/Z-Image-Turbo" in "".join(result.stdout.split())  # argparse wraps lines at hyphens
    assert "(--guidance-scale 0)" in result.stdout and "(default: 8)" in result.stdout
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "0 turns it off" in text and "1 or less turns it off" not in text
