"""SD2/run.py end to end, in a subprocess, on a tiny model saved to a folder."""

import numpy as np
import pytest
from conftest import COMMON_BAD_INPUTS, assert_refused_in_one_line, run_script
from PIL import Image

from tools.maps import save_map

SCRIPT = "SD2/run.py"


def test_run_writes_a_png_with_its_parameters(sd_dir, inputs, tmp_path):
    image, map_path = inputs
    output = tmp_path / "edit.png"
    result = run_script(
        SCRIPT, "--model", sd_dir, "--device", "cpu", "--image", image, "--map", map_path, "--prompt", "a red apple",
        "--steps", "10", "--strength", "0.5", "--seed", "7", "--output", output, "--compare",
    )
    assert result.returncode == 0, result.stderr
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.startswith(str(output)) and "5 denoising steps" in last_line
    with Image.open(output) as written:
        assert written.size == (64, 64) and written.format == "PNG"
        text = written.text
    assert text["prompt"] == "a red apple" and text["seed"] == "7" and text["strength"] == "0.5"
    assert text["model"] == str(sd_dir) and text["map"].endswith("map.png")
    with Image.open(tmp_path / "edit-compare.png") as strip:
        assert strip.width >= 3 * 64


@pytest.mark.parametrize(
    "case, extra, message",
    COMMON_BAD_INPUTS + [
        ("hub model offline", ["--model", "someone/not-cached-model"], "--model PATH"),
        ("map and mask", ["--mask", "{map}"], "--map and --mask"),
        ("feather without a mask", ["--feather", "8"], "--mask PATH"),
    ],
)
def test_bad_input_gives_one_line_and_leaves_inputs_untouched(sd_dir, inputs, tmp_path, case, extra, message):
    image, map_path = inputs
    base = ["--model", sd_dir, "--device", "cpu", "--image", image, "--map", map_path, "--prompt", "x", "--steps", "2"]
    assert_refused_in_one_line(SCRIPT, base, extra, message, inputs, tmp_path)


def test_help_documents_every_flag():
    result = run_script(SCRIPT, "--help")
    flags = ["--model", "--image", "--map", "--invert-map", "--prompt", "--negative-prompt", "--steps",
             "--guidance-scale", "--strength", "--seed", "--output", "--device", "--dtype", "--offload",
             "--scheduler", "--compare"]
    assert result.returncode == 0
    assert all(flag in result.stdout for flag in flags)


def test_existing_output_is_never_overwritten(sd_dir, inputs, tmp_path):
    image, map_path = inputs
    taken = tmp_path / "edit.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(taken)
    before = taken.read_bytes()
    result = run_script(SCRIPT, "--model", sd_dir, "--device", "cpu", "--image", image, "--map", map_path,
                        "--prompt", "x", "--steps", "2", "--output", taken)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert taken.read_bytes() == before


def test_keep_exact_writes_the_input_bytes_where_the_map_is_white(sd_dir, inputs, tmp_path):
    image, map_path = inputs  # the left half changes fully, the right half is kept
    output = tmp_path / "exact.png"
    result = run_script(SCRIPT, "--model", sd_dir, "--device", "cpu", "--image", image, "--map", map_path,
                        "--prompt", "a red apple", "--steps", "4", "--keep-exact", "--output", output)
    assert result.returncode == 0, result.stderr
    with Image.open(image) as source, Image.open(output) as written:
        original, edited = np.asarray(source.convert("RGB")), np.asarray(written.convert("RGB"))
        assert written.text["keep_exact"] == "True"
    assert np.array_equal(edited[:, 32:], original[:, 32:])
    assert np.abs(edited[:, :32].astype(int) - original[:, :32]).mean() > 5  # the left half did change


def square_mask(path, box=(16, 16, 40, 40)):
    """An inpainting mask, white = the region to fill, in ``box`` (left, top, right, bottom) of a 64 x 64 image."""
    mask = np.zeros((64, 64), np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    Image.fromarray(mask).save(path)
    return path


def test_mask_fills_its_region_and_keeps_everything_beyond_the_feather(sd_dir, inputs, tmp_path):
    image, _ = inputs
    mask, output = square_mask(tmp_path / "hole.png"), tmp_path / "filled.png"
    result = run_script(SCRIPT, "--model", sd_dir, "--device", "cpu", "--image", image, "--mask", mask,
                        "--feather", "8", "--grow", "2", "--keep-exact", "--prompt", "a red apple", "--steps", "4",
                        "--output", output, "--compare")
    assert result.returncode == 0, result.stderr
    assert "4 denoising steps" in result.stdout  # the region is changed fully: the whole schedule runs
    with Image.open(image) as source, Image.open(output) as written:
        original, edited = np.asarray(source.convert("RGB")), np.asarray(written.convert("RGB"))
        text = dict(written.text)
    assert (text["mask"].endswith("hole.png"), text["feather"], text["grow"]) == (True, "8.0", "2.0")
    # The region grown by 2 px and feathered over 8 px ends 10 px from the square: beyond it, the input's bytes.
    beyond = np.ones((64, 64), bool)
    beyond[16 - 10 : 40 + 10, 16 - 10 : 40 + 10] = False
    assert np.array_equal(edited[beyond], original[beyond])
    assert np.abs(edited[16:40, 16:40].astype(int) - original[16:40, 16:40]).mean() > 5
    with Image.open(tmp_path / "filled-compare.png") as strip:
        assert strip.size == (3 * 64, 64)


def test_a_map_of_another_shape_is_stretched_to_the_image_with_a_warning(sd_dir, inputs, tmp_path):
    image, _ = inputs
    wide_map = tmp_path / "wide.png"
    save_map(np.zeros((32, 64), np.float32), wide_map)
    result = run_script(SCRIPT, "--model", sd_dir, "--device", "cpu", "--image", image, "--map", wide_map,
                        "--prompt", "x", "--steps", "2", "--output", tmp_path / "out.png")
    assert result.returncode == 0, result.stderr
    assert "stretched to fit" in result.stderr and (tmp_path / "out.png").is_file()
