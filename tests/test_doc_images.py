"""docs/images holds the maps that tools.make_doc_images draws today, and stays small."""

import numpy as np
from PIL import Image

from tools import make_doc_images

UNLABELLED = ["map_gradient.png", "map_radial.png", "map_regions.png", "adherence_bins.png"]


def test_doc_images_are_what_the_tools_draw(tmp_path):
    assert make_doc_images.main(["--out", str(tmp_path)]) == 0
    committed = sorted(path.name for path in make_doc_images.DOC_IMAGES.iterdir())
    assert committed == sorted(path.name for path in tmp_path.iterdir())
    for name in committed:
        with Image.open(tmp_path / name) as fresh, Image.open(make_doc_images.DOC_IMAGES / name) as stored:
            assert fresh.size == stored.size and fresh.mode == stored.mode, name
            if name in UNLABELLED:  # text rendering may vary with the font library; maps may not
                assert np.array_equal(np.asarray(fresh), np.asarray(stored)), name


def test_doc_images_are_small():
    assert sum(path.stat().st_size for path in make_doc_images.DOC_IMAGES.iterdir()) < 300_000
