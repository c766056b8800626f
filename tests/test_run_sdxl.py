"""What only SDXL/run.py does, on a tiny base and refiner saved to folders: its working size, the base alone, and
the crop through both stages. tests/test_run_contract.py checks what every run.py does, SDXL's base and refiner
among them."""

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run_in_process, test_image
from PIL import Image

from SDXL import run as sdxl_run
from SDXL.run import output_size
from tools import cli, loading
from tools.maps import save_map

SCRIPT = "SDXL/run.py"


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


@pytest.mark.parametrize("image_size, width, height, expected", [
    ((512, 512), None, None, (1024, 1024)),  # about one megapixel, as SDXL was trained
    ((3000, 2000), None, None, (1256, 840)), ((3000, 2000), 1024, None, (1024, 680)),
    ((3000, 2000), None, 512, (768, 512)), ((3000, 2000), 640, 640, (640, 640)),  # both given: exactly, stretched
])
def test_output_size(image_size, width, height, expected):
    assert output_size(image_size, width, height) == expected






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
    latents = base(image=crop, generator=[loading.make_generator(3)], denoising_end=0.8, output_type="latent",
                   **common).images
    by_hand = refiner(image=latents, original_image=crop, generator=[loading.make_generator(3)], denoising_start=0.8,
                      **common).images[0]
    assert np.array_equal(edited[36:60, 4:28], np.asarray(by_hand))
    assert np.abs(edited[40:56, 8:24].astype(int) - original[40:56, 8:24]).mean() > 5


def test_a_working_size_below_the_unets_smallest_grid_is_one_line_before_any_step():
    """SDXL's UNet (3 levels over a VAE of factor 8) needs 32 px a side; --width 8 gave a traceback from deep inside
    torch. The tiny test UNet needs 4 px, less than any size SDXL/run.py makes, so SDXL's numbers stand in here."""
    unet = SimpleNamespace(config=SimpleNamespace(block_out_channels=(320, 640, 1280)))
    base = SimpleNamespace(vae_scale_factor=8, unet=unet)  # a call of it would fail: none may happen
    args = sdxl_run.build_parser().parse_args(["--width", "8", "--height", "64"])
    with pytest.raises(cli.CliError, match=r"edited at 8x64 pixels, smaller than 32x32, .* of at least 32$"):
        sdxl_run.edit(sdxl_run.Pipelines(base, None), args, images=[Image.new("RGB", (64, 64))], maps=[None],
                      prompts=["x"], negative_prompts=[""], seeds=[0])
