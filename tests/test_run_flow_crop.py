"""--crop-margin end to end through the flow families' run.py, in a subprocess, on their tiny models saved to folders.

One test per family: the subprocess is the cost, and tests/test_crop.py checks the pipelines' crop contract itself.
"""

import numpy as np
import pytest
from conftest import run_script
from flow_models import save_flux, save_sd3
from flow_models2 import save_chroma, save_qwenimage, save_zimage
from PIL import Image

from tools.maps import save_map

SAVERS = {
    "SD3": save_sd3, "Flux": save_flux, "Chroma": save_chroma, "QwenImage": save_qwenimage, "ZImage": save_zimage,
}


@pytest.mark.parametrize("family", SAVERS)
def test_crop_margin_edits_the_box_around_the_change_and_keeps_the_rest_byte_for_byte(family, inputs, tmp_path):
    model_dir = SAVERS[family](tmp_path / "model")
    image, _ = inputs
    keep_map = np.ones((64, 64), np.float32)
    # The pixels that change; the tiny models' size unit is 4 px (2x2 latent patches at a VAE factor of 2), so with
    # 4 px of margin the crop is rows 36-59, columns 4-27.
    keep_map[40:56, 8:24] = 0.0
    map_path = tmp_path / "block.png"
    save_map(keep_map, map_path)
    output = tmp_path / "cropped.png"
    result = run_script(f"{family}/run.py", "--model", model_dir, "--device", "cpu", "--image", image, "--map",
                        map_path, "--prompt", "a red apple", "--steps", "3", "--crop-margin", "4", "--output", output)
    assert result.returncode == 0, result.stderr
    with Image.open(image) as source, Image.open(output) as written:
        original, edited = np.asarray(source.convert("RGB")), np.asarray(written.convert("RGB"))
        assert written.text["crop_margin"] == "4" and written.text["crop_upscale"] == "False"
    outside = np.ones((64, 64), bool)
    outside[36:60, 4:28] = False
    assert np.array_equal(edited[outside], original[outside])
    assert np.abs(edited[40:56, 8:24].astype(int) - original[40:56, 8:24]).mean() > 5
