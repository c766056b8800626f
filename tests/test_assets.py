import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools import make_assets

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MAPS = ["map_gradient.png", "map_regions.png", "map_soft_inpaint.png", "mask_inpaint.png"]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_assets_are_small_and_complete():
    expected = {"input.jpg", "prompt.txt", "negative_prompt.txt", "convention.png", "README.md", *MAPS}
    assert expected <= {path.name for path in ASSETS.iterdir()}
    assert (ASSETS / "input.jpg").stat().st_size < 250_000
    assert sum(path.stat().st_size for path in ASSETS.iterdir()) < 1_500_000
    readme = (ASSETS / "README.md").read_text()
    for name in expected - {"README.md"}:
        assert f"`{name}`" in readme, f"assets/README.md does not describe {name}"


@pytest.mark.parametrize("name", ["prompt.txt", "negative_prompt.txt"])
def test_prompts_are_one_line(name):
    lines = (ASSETS / name).read_text().splitlines()
    assert len(lines) == 1 and lines[0].strip()


@pytest.mark.parametrize("name", MAPS)
def test_maps_are_grayscale_at_the_photo_size(name):
    with Image.open(ASSETS / name) as image, Image.open(ASSETS / "input.jpg") as photo:
        assert image.mode == "L" and image.size == photo.size


def test_each_map_holds_what_its_name_promises():
    # The gradient changes the left and keeps the right.
    gradient = pixels(ASSETS / "map_gradient.png")
    assert np.all(gradient[:, 0] == 0) and np.all(gradient[:, -1] == 255)
    # The soft inpainting map changes the masked region fully.
    fill = pixels(ASSETS / "mask_inpaint.png")
    soft = pixels(ASSETS / "map_soft_inpaint.png")
    assert set(np.unique(fill)) == {0, 255}  # the mask is binary, white = fill
    assert np.all(soft[fill == 255] == 0)
    assert soft[0, 0] == 255 and soft[-1, 0] == 255  # far from the shuttle: kept
    # The region map holds exactly the listed strengths.
    keep_levels = {round((1 - s) * 255) for s in make_assets.REGION_STRENGTHS.values()}
    assert set(np.unique(pixels(ASSETS / "map_regions.png"))) == keep_levels


def test_make_assets_reproduces_the_committed_maps(tmp_path):
    shutil.copy(ASSETS / "input.jpg", tmp_path / "input.jpg")
    make_assets.main(["--assets", str(tmp_path)])
    for name in MAPS:
        np.testing.assert_array_equal(pixels(tmp_path / name), pixels(ASSETS / name), err_msg=name)
    assert (tmp_path / "convention.png").exists()
