"""SD2/run.py end to end on a tiny model saved to a folder: the runs that look at a real process's stderr in a
subprocess, the others in this process."""

import re

import numpy as np
import pytest
from conftest import COMMON_BAD_INPUTS, assert_refused_in_one_line, run_in_process, run_script
from PIL import Image

from tools.maps import save_map

SCRIPT = "SD2/run.py"


def test_run_writes_a_png_with_its_parameters(sd_dir, inputs, tmp_path):
    image, map_path = inputs
    output = tmp_path / "edit.png"
    result = run_script(
        SCRIPT, "--model", sd_dir, "--device", "cpu", "--image", image, "--map", map_path, "--prompt", "a red apple",
        "--negative-prompt", "blurry", "--steps", "10", "--strength", "0.5", "--seed", "7", "--output", output,
        "--compare",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{output} (" + result.stdout.split(" (", 1)[1] and result.stdout.count("\n") == 1
    assert "5 denoising steps" in result.stdout
    # stderr: diffusers' progress bars, and the one line the design asks for on the CPU; no library warning (#11)
    assert not_progress_bars(result.stderr) == ["warning: running on the CPU in fp32; this takes minutes"]
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


def not_progress_bars(stderr):
    """The pieces of ``stderr`` that are not tqdm progress bars (``Loading weights: 100%|...| 36/36 [...]``)."""
    pieces = re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr))  # bars redraw with \r and ANSI codes
    return [piece for piece in pieces if piece.strip() and not re.match(r"^[\w .]*:?\s*\d+%\|.*\| \d+/\d+ \[", piece)]


@pytest.mark.parametrize("case, extra, message", [
    ("an SDXL checkpoint", ["--model", "{sdxl}"], "an SDXL checkpoint (StableDiffusionXLImg2ImgPipeline), for "
     "SDXL/run.py; here --model takes an SD 1.x/2.x checkpoint"),
    ("a missing image", ["--image", "{tmp}/nowhere.png"], "--image"),
])
def test_an_error_is_the_only_line_on_stderr(sd_dir, sdxl_base_dir, inputs, tmp_path, case, extra, message):
    image, map_path = inputs
    extra = [value.format(sdxl=sdxl_base_dir, tmp=tmp_path) for value in extra]
    result = run_script(SCRIPT, "--model", sd_dir, "--device", "cpu", "--image", image, "--map", map_path, "--prompt",
                        "x", "--steps", "2", "--output", tmp_path / "out.png", *extra)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()] and message in result.stderr, result.stderr
    assert not (tmp_path / "out.png").exists()


def test_an_image_smaller_than_a_latent_cell_is_refused_in_one_line(sd_dir, inputs, tmp_path):
    _, map_path = inputs
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    result = run_in_process(SCRIPT, "--model", sd_dir, "--device", "cpu", "--image", tmp_path / "dot.png", "--map",
                        map_path, "--prompt", "x", "--steps", "2", "--output", tmp_path / "out.png")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1
    assert "--image: the image is 1x1 pixels, smaller than one 2x2 cell of the model's latent grid" in errors[0]
    assert not (tmp_path / "out.png").exists()


def test_help_documents_every_flag():
    result = run_script(SCRIPT, "--help")
    flags = ["--model", "--image", "--map", "--invert-map", "--prompt", "--negative-prompt", "--steps",
             "--guidance-scale", "--strength", "--seed", "--output", "--device", "--dtype", "--offload",
             "--scheduler", "--compare", "--controlnet", "--control-image", "--control", "--controlnet-scale",
             "--depth-model", "--inpaint-model"]
    assert result.returncode == 0
    assert all(flag in result.stdout for flag in flags)


def test_existing_output_is_never_overwritten(sd_dir, inputs, tmp_path):
    image, map_path = inputs
    taken = tmp_path / "edit.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(taken)
    before = taken.read_bytes()
    result = run_in_process(SCRIPT, "--model", sd_dir, "--device", "cpu", "--image", image, "--map", map_path,
                        "--prompt", "x", "--steps", "2", "--output", taken)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert taken.read_bytes() == before


def test_keep_exact_writes_the_input_bytes_where_the_map_is_white(sd_dir, inputs, tmp_path):
    image, map_path = inputs  # the left half changes fully, the right half is kept
    output = tmp_path / "exact.png"
    result = run_in_process(SCRIPT, "--model", sd_dir, "--device", "cpu", "--image", image, "--map", map_path,
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
    result = run_in_process(SCRIPT, "--model", sd_dir, "--device", "cpu", "--image", image, "--mask", mask,
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
    result = run_in_process(SCRIPT, "--model", sd_dir, "--device", "cpu", "--image", image, "--map", wide_map,
                        "--prompt", "x", "--steps", "2", "--output", tmp_path / "out.png")
    assert result.returncode == 0, result.stderr
    assert "stretched to fit" in result.stderr and (tmp_path / "out.png").is_file()

