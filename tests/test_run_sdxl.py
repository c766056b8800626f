"""SDXL/run.py end to end on a tiny base and refiner saved to folders: the runs that look at a real process's stderr in
a subprocess, the others in this process."""

import numpy as np
import pytest
from conftest import COMMON_BAD_INPUTS, assert_refused_in_one_line, run_in_process, run_script, test_image
from PIL import Image

from SDXL import run as sdxl_run
from SDXL.run import output_size
from tools import cli
from tools.maps import save_map

SCRIPT = "SDXL/run.py"


def test_base_and_refiner_write_a_png_with_their_parameters(sdxl_base_dir, sdxl_refiner_dir, inputs, tmp_path):
    image, map_path = inputs
    output = tmp_path / "edit.png"
    result = run_script(
        SCRIPT, "--model", sdxl_base_dir, "--refiner", sdxl_refiner_dir, "--device", "cpu", "--image", image,
        "--map", map_path, "--prompt", "a red apple", "--steps", "10", "--strength", "0.5", "--seed", "7",
        "--width", "64", "--height", "64", "--keep-exact", "--output", output, "--compare",
    )
    assert result.returncode == 0, result.stderr
    last_line = result.stdout.strip().splitlines()[-1]
    # Strength 0.5 of 10 steps: steps 5 to 7 in the base, 8 and 9 in the refiner, which starts at 0.8.
    assert last_line.startswith(str(output)) and "5 denoising steps" in last_line
    with Image.open(output) as written, Image.open(image) as source:
        assert written.size == (64, 64) and written.format == "PNG"
        text = written.text
        edited, original = np.asarray(written.convert("RGB")), np.asarray(source.convert("RGB"))
    # --keep-exact in the refiner, which ends the schedule: the kept right half is the input's own bytes
    assert np.array_equal(edited[:, 32:], original[:, 32:]) and text["keep_exact"] == "True"
    assert np.abs(edited[:, :32].astype(int) - original[:, :32]).mean() > 5
    assert text["prompt"] == "a red apple" and text["seed"] == "7" and text["strength"] == "0.5"
    assert text["model"] == str(sdxl_base_dir) and text["refiner"] == str(sdxl_refiner_dir)
    assert text["refiner_start"] == "0.8" and (text["width"], text["height"]) == ("64", "64")
    assert text["guidance_scale"] == "17.5"
    with Image.open(tmp_path / "edit-compare.png") as strip:
        assert strip.width >= 3 * 64


def test_base_alone_keeps_the_aspect_ratio_from_one_side_and_takes_a_mask(sdxl_base_dir, tmp_path):
    image, mask, output = tmp_path / "wide.png", tmp_path / "hole.png", tmp_path / "edit.png"
    test_image(size=96).resize((96, 64)).save(image)
    hole = np.zeros((64, 96), np.uint8)
    hole[16:48, 24:72] = 255  # soft inpainting: white is the region to fill
    Image.fromarray(hole).save(mask)
    result = run_in_process(
        SCRIPT, "--model", sdxl_base_dir, "--no-refiner", "--device", "cpu", "--image", image, "--mask", mask,
        "--feather", "8", "--prompt", "x", "--steps", "4", "--width", "64", "--output", output,
    )
    assert result.returncode == 0, result.stderr
    assert "4 denoising steps" in result.stdout  # the region changes fully
    with Image.open(output) as written:
        assert written.size == (64, 40)  # 64 / 1.5 = 42.7, to the nearest multiple of 8
        text = written.text
    assert text["refiner"] == "none" and "refiner_start" not in text
    assert text["mask"].endswith("hole.png") and text["feather"] == "8.0"


@pytest.mark.parametrize(
    "image_size, width, height, expected",
    [
        ((512, 512), None, None, (1024, 1024)),  # about one megapixel, as SDXL was trained
        ((3000, 2000), None, None, (1256, 840)),
        ((3000, 2000), 1024, None, (1024, 680)),
        ((3000, 2000), None, 512, (768, 512)),
        ((3000, 2000), 640, 640, (640, 640)),  # both given: exactly that, stretched
    ],
)
def test_output_size(image_size, width, height, expected):
    assert output_size(image_size, width, height) == expected


@pytest.mark.parametrize(
    "case, extra, message",
    COMMON_BAD_INPUTS + [
        ("hub model offline", ["--model", "someone/not-cached-model"], "--model PATH"),
        ("missing refiner folder", ["--refiner", "{tmp}/no-refiner-here"], "--refiner"),
        ("height not a multiple of 8", ["--height", "100"], "--height: must be a multiple of 8"),
        ("width not a number", ["--width", "wide"], "--width: must be a multiple of 8"),
        ("refiner start out of range", ["--refiner-start", "1"], "--refiner-start"),
        ("map and mask", ["--mask", "{map}"], "--map and --mask"),
        ("feather without a mask", ["--feather", "8"], "--mask PATH"),
    ],
)
def test_bad_input_gives_one_line_and_leaves_inputs_untouched(sdxl_base_dir, inputs, tmp_path, case, extra, message):
    image, map_path = inputs
    base = ["--model", sdxl_base_dir, "--device", "cpu", "--image", image, "--map", map_path, "--prompt", "x",
            "--steps", "2", "--width", "64", "--height", "64"]
    assert_refused_in_one_line(SCRIPT, base, extra, message, inputs, tmp_path)


def test_help_documents_every_flag():
    result = run_script(SCRIPT, "--help")
    flags = ["--model", "--image", "--map", "--invert-map", "--prompt", "--negative-prompt", "--steps",
             "--guidance-scale", "--strength", "--seed", "--output", "--device", "--dtype", "--offload",
             "--scheduler", "--compare", "--controlnet", "--control-image", "--control", "--controlnet-scale",
             "--depth-model", "--inpaint-model", "--refiner", "--no-refiner", "--refiner-start", "--width", "--height"]
    assert result.returncode == 0
    assert all(flag in result.stdout for flag in flags)
    assert "default: 17.5" in result.stdout and "default: 100" in result.stdout


def test_crop_margin_runs_base_and_refiner_on_the_crop_alone_and_keeps_the_rest_byte_for_byte(
    sdxl_base_dir, sdxl_refiner_dir, inputs, tmp_path
):
    image, _ = inputs
    keep_map = np.ones((64, 64), np.float32)
    keep_map[40:56, 8:24] = 0.0  # the pixels that change; with 4 px of margin the crop is rows 36-59, columns 4-27
    map_path, output = tmp_path / "block.png", tmp_path / "cropped.png"
    save_map(keep_map, map_path)
    models = ["--model", sdxl_base_dir, "--refiner", sdxl_refiner_dir, "--device", "cpu", "--width", "64",
              "--height", "64"]
    argv = [*models, "--image", image, "--map", map_path, "--prompt", "a red apple", "--steps", "4", "--seed", "3",
            "--crop-margin", "4", "--output", output]
    ran = run_in_process(SCRIPT, *argv)  # a subprocess would cost more than the run
    assert ran.returncode == 0, ran.stderr
    assert "4 denoising steps" in ran.stdout  # 3 in the base, the last in the refiner, which starts at 0.8
    with Image.open(image) as source, Image.open(output) as written:
        original, edited = np.asarray(source.convert("RGB")), np.asarray(written.convert("RGB"))
        assert written.text["crop_margin"] == "4" and written.text["crop_upscale"] == "False"
        negative_prompt = written.text["negative_prompt"]
    outside = np.ones((64, 64), bool)
    outside[36:60, 4:28] = False
    assert np.array_equal(edited[outside], original[outside])

    # Inside: base and refiner run by hand on the cropped working image and map, as run.py runs them uncropped.
    base, refiner = sdxl_run.load_pipelines(cli.parse_args(sdxl_run.build_parser(), [str(arg) for arg in models]))
    with Image.open(image) as source:
        working = base.image_processor.preprocess(source) / 2 + 0.5
    crop, crop_map = working[..., 36:60, 4:28], keep_map[36:60, 4:28]
    common = dict(prompt=["a red apple"], negative_prompt=[negative_prompt], map=[crop_map], num_inference_steps=4,
                  guidance_scale=17.5)
    latents = base(image=crop, generator=[cli.make_generator(3)], denoising_end=0.8, output_type="latent",
                   **common).images
    by_hand = refiner(image=latents, original_image=crop, generator=[cli.make_generator(3)], denoising_start=0.8,
                      **common).images[0]
    assert np.array_equal(edited[36:60, 4:28], np.asarray(by_hand))
    assert np.abs(edited[40:56, 8:24].astype(int) - original[40:56, 8:24]).mean() > 5
