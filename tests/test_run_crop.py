"""--crop-margin end to end through every family's run.py, on its tiny model saved to a folder.

Each run.py runs in this process (conftest's `run_in_process`): a subprocess per family would cost more than the
edit, and the one-line errors and subprocess behaviour of run.py are tested in tests/test_run_*.py.
tests/test_crop.py checks the pipelines' crop contract itself.
"""

import numpy as np
import pytest
from conftest import run_in_process
from flow_models import save_flux, save_sd3
from flow_models2 import save_chroma, save_qwenimage, save_zimage
from PIL import Image

from tools import cli, loading
from tools.maps import save_map


def saved(save):
    return lambda request, folder: ["--model", save(folder)]


MODELS = {  # family: (the test's request, a free folder) -> the flags that load its tiny saved model(s)
    "sd2": lambda request, folder: ["--model", request.getfixturevalue("sd_dir")],
    "kandinsky": lambda request, folder: [
        "--prior", request.getfixturevalue("kandinsky_prior_dir"), "--prior-steps", "2",
        "--model", request.getfixturevalue("kandinsky_decoder_dir"), "--height", "64", "--width", "64"],
    "sd3": saved(save_sd3), "flux": saved(save_flux), "chroma": saved(save_chroma),
    "qwenimage": saved(save_qwenimage), "zimage": saved(save_zimage),
}


@pytest.mark.parametrize("family", MODELS)
def test_crop_margin_edits_the_box_around_the_change_and_keeps_the_rest_byte_for_byte(
    family, inputs, tmp_path, request
):
    image, _ = inputs
    keep_map = np.ones((64, 64), np.float32)
    # The pixels that change. The tiny models' size units (2 px for SD, 4 px for Kandinsky and for 2x2 latent patches
    # at a VAE factor of 2) divide the box, so with 4 px of margin the crop is rows 36-59, columns 4-27 in every
    # family.
    keep_map[40:56, 8:24] = 0.0
    map_path, output = tmp_path / "block.png", tmp_path / "cropped.png"
    save_map(keep_map, map_path)
    flags = [*MODELS[family](request, tmp_path / "model"), "--device", "cpu", "--image", image, "--map", map_path,
             "--prompt", "a red apple", "--steps", "3", "--crop-margin", "4", "--output", output]
    ran = run_in_process(loading.families()[family].relative_to(cli.REPO_ROOT), *flags)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith(f"{output} (")
    with Image.open(image) as source, Image.open(output) as written:
        original, edited = np.asarray(source.convert("RGB")), np.asarray(written.convert("RGB"))
        assert written.text["crop_margin"] == "4" and written.text["crop_upscale"] == "False"
    outside = np.ones((64, 64), bool)
    outside[36:60, 4:28] = False
    assert np.array_equal(edited[outside], original[outside])
    assert np.abs(edited[40:56, 8:24].astype(int) - original[40:56, 8:24]).mean() > 5
