"""Regenerate the example maps in `assets/` from the example photo.

    python -m tools.make_assets              # rewrites the maps and assets/convention.png
    python -m tools.make_assets --assets DIR # writes into another folder (copies the photo there if missing)

The photo `input.jpg` is copied from scikit-image (`skimage.data.astronaut()`, NASA, public domain) only when it is
missing; nothing else needs scikit-image. Every map is drawn with `tools.maps` at the photo's size, and the output
is the same on every run. The regions and the inpainting mask were drawn by hand on the 512 × 512 photo; they are
scaled to the photo's size, so they only fit this photo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tools.maps import feathered_mask, linear_gradient, region_map, save_map

ASSETS = Path(__file__).resolve().parents[1] / "assets"
PHOTO_NAME = "input.jpg"
DRAWN_ON = 512  # the shapes below are in pixels of the 512 × 512 photo

# Regions of the photo, in drawing order (later shapes cover earlier ones), each with its strength
# (0 = keep, 1 = change fully). The backdrop changes fully, the face hardly at all.
BACKDROP, FLAG, SHUTTLE, SUIT, HELMET, FACE = range(6)
REGION_STRENGTHS = {BACKDROP: 1.0, FLAG: 0.7, SHUTTLE: 0.7, SUIT: 0.45, HELMET: 0.45, FACE: 0.15}
FLAG_POLYGON = [(0, 0), (78, 0), (92, 110), (100, 230), (100, 512), (0, 512)]
SHUTTLE_POLYGON = [
    (398, 0), (432, 0), (440, 45), (452, 190), (470, 232), (472, 290), (362, 292), (354, 232), (378, 186), (384, 50),
]
SUIT_POLYGON = [
    (18, 512), (22, 330), (58, 280), (112, 244), (112, 200), (140, 165), (185, 148), (262, 158), (296, 188),
    (308, 230), (304, 255), (346, 282), (362, 340), (368, 512),
]
HELMET_ELLIPSE = (276, 340, 516, 580)
FACE_ELLIPSE = (152, 14, 302, 190)

# Soft inpainting repaints the model shuttle; the feather blends the new paint into the wall around it.
INPAINT_POLYGON = SHUTTLE_POLYGON
INPAINT_GROW_PX = 6
INPAINT_FEATHER_PX = 40


def scaled(points, size: tuple[int, int]) -> list[tuple[float, float]]:
    """Scale `(x, y)` points (or a flat box) drawn on the 512 × 512 photo to an image of `size` (width, height)."""
    width, height = size
    if isinstance(points[0], (int, float)):
        points = list(zip(points[::2], points[1::2]))
    return [(x * width / DRAWN_ON, y * height / DRAWN_ON) for x, y in points]


def region_labels(size: tuple[int, int]) -> np.ndarray:
    """Integer label image (height, width) of the photo's regions; see `REGION_STRENGTHS`."""
    labels = Image.new("L", size, BACKDROP)
    draw = ImageDraw.Draw(labels)
    draw.polygon(scaled(FLAG_POLYGON, size), fill=FLAG)
    draw.polygon(scaled(SHUTTLE_POLYGON, size), fill=SHUTTLE)
    draw.polygon(scaled(SUIT_POLYGON, size), fill=SUIT)
    draw.ellipse(_box(scaled(HELMET_ELLIPSE, size)), fill=HELMET)
    draw.ellipse(_box(scaled(FACE_ELLIPSE, size)), fill=FACE)
    return np.asarray(labels)


def inpaint_mask(size: tuple[int, int]) -> np.ndarray:
    """Boolean mask (height, width) of the region to fill: True = fill, as inpainting masks are."""
    mask = Image.new("1", size, 0)
    ImageDraw.Draw(mask).polygon(scaled(INPAINT_POLYGON, size), fill=1)
    return np.asarray(mask, dtype=bool)


def _box(corners: list[tuple[float, float]]) -> list[float]:
    (left, top), (right, bottom) = corners
    return [left, top, right, bottom]


def copy_photo(path: Path) -> None:
    """Copy scikit-image's astronaut photo (NASA, public domain) to `path` as a high-quality JPEG."""
    try:
        from skimage import data  # only this one-time copy needs scikit-image
    except ImportError:
        raise ModuleNotFoundError(
            f"{path} is missing, and copying it needs scikit-image (pip install scikit-image)."
        ) from None
    Image.fromarray(data.astronaut()).save(path, format="JPEG", quality=95, subsampling=0, optimize=True)


def convention_picture(width: int = 760) -> Image.Image:
    """Explain both map conventions: the same black-to-white strip read as keep (default) and as strength."""
    rows = [
        (
            "Default (the paper's convention): the map says how much to KEEP",
            "0 = black = change fully (strength 1)",
            "1 = white = keep (strength 0)",
        ),
        (
            "invert_map=True / --invert-map: the map says how much to CHANGE (ComfyUI, A1111, inpainting masks)",
            "0 = black = keep (strength 0)",
            "1 = white = change fully (strength 1)",
        ),
    ]
    margin, strip_height, row_height = 20, 44, 122
    picture = Image.new("RGB", (width, margin + row_height * len(rows)), "white")
    draw = ImageDraw.Draw(picture)
    title_font, label_font = ImageFont.load_default(size=15), ImageFont.load_default(size=14)
    ramp = np.linspace(0, 255, width - 2 * margin).round().astype(np.uint8)
    strip = Image.fromarray(np.tile(ramp, (strip_height, 1))).convert("RGB")

    for index, (title, left_label, right_label) in enumerate(rows):
        top = margin + index * row_height
        draw.text((margin, top), title, fill="black", font=title_font)
        strip_top = top + 26
        picture.paste(strip, (margin, strip_top))
        draw.rectangle([margin - 1, strip_top - 1, width - margin, strip_top + strip_height], outline=(128, 128, 128))
        strip_bottom = strip_top + strip_height
        for tick_x in (margin, width // 2, width - margin - 1):
            draw.line([tick_x, strip_bottom, tick_x, strip_bottom + 5], fill="black")
        label_top = strip_bottom + 9
        draw.text((margin, label_top), left_label, fill="black", font=label_font)
        draw.text((width - margin, label_top), right_label, fill="black", font=label_font, anchor="ra")
        draw.text((width // 2, label_top), "0.5 = strength 0.5", fill="black", font=label_font, anchor="ma")
    return picture


def make_assets(assets: Path = ASSETS) -> list[Path]:
    """Write every map (and the convention picture) into `assets`, replacing older versions. Returns the paths."""
    photo_path = assets / PHOTO_NAME
    if not photo_path.exists():
        copy_photo(photo_path)
    with Image.open(photo_path) as photo:
        size = photo.size
    width, height = size

    fill = inpaint_mask(size)
    maps = {
        # Left edge changes fully, right edge is kept: the edit fades in from right to left.
        "map_gradient.png": linear_gradient(width, height, angle_degrees=0, start=0.0, end=1.0),
        "map_regions.png": region_map(region_labels(size), REGION_STRENGTHS),
        "map_soft_inpaint.png": feathered_mask(fill, feather_px=INPAINT_FEATHER_PX, grow_px=INPAINT_GROW_PX),
        # Saved as a map of the region to fill, so white = fill, the inpainting convention.
        "mask_inpaint.png": fill.astype(np.float32),
    }
    written = [save_map(array, assets / name, overwrite=True) for name, array in maps.items()]
    convention_picture().save(assets / "convention.png", optimize=True)
    return [*written, assets / "convention.png"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.make_assets", description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=ASSETS, help="folder to write into (default: assets/)")
    args = parser.parse_args(argv)
    args.assets.mkdir(parents=True, exist_ok=True)
    try:
        written = make_assets(args.assets)
    except (ImportError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
