"""Draw the pictures of docs/tools.md, docs/edit-models.md and docs/video.md: the maps each tool makes from the example
photo, and what the pipelines make of a map step by step; nothing else.

    python -m tools.make_doc_images               # rewrites docs/images/
    python -m tools.make_doc_images --out DIR     # writes into another folder

Every picture is a map (or a set of maps) drawn by the same code the tools run, at the size of assets/input.jpg and
shrunk to a small preview, or the crop rule drawn on the photo; none needs a model, so none shows a model's output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tools import cli
from tools.fan import draw_label, label_fan, sweep_grid, uniform_map
from tools.make_assets import INPAINT_FEATHER_PX, INPAINT_GROW_PX, REGION_STRENGTHS, inpaint_mask, region_labels
from tools.maps import fade_maps, linear_gradient, radial, region_map, strength_fan

DOC_IMAGES = cli.REPO_ROOT / "docs" / "images"
PREVIEW = 256  # pixels per side of each map's preview
SWEEP_TILE = 96
ADHERENCE_BINS = 10
CROP_STEPS, CROP_MARGIN, CROP_SCALE = 50, 32, 8  # a 50-step SD run, 32 px of margin, 8 px per latent cell
RELEASE_STEPS, RELEASE_SHOWN = 28, (0, 7, 14, 21)  # FLUX.1 Kontext's default schedule, and the steps drawn
FADE_FRAMES, FADE, FADE_SHOWN = 81, (20, 60), (20, 30, 40, 50, 60)  # Wan/run.py's 81 frames; the frames drawn


def _preview(keep_map: np.ndarray | Image.Image) -> Image.Image:
    if not isinstance(keep_map, Image.Image):
        keep_map = Image.fromarray(np.rint(np.clip(keep_map, 0, 1) * 255).astype(np.uint8))
    return keep_map.resize((PREVIEW, round(PREVIEW * keep_map.height / keep_map.width)), Image.Resampling.BOX)


def _side_by_side(left: Image.Image, right: Image.Image, labels: tuple[str, str]) -> Image.Image:
    pair = Image.new("RGB", (left.width + right.width + 4, max(left.height, right.height)), (32, 32, 32))
    for index, (panel, label) in enumerate(zip((left, right), labels)):
        x = index * (left.width + 4)
        pair.paste(panel.convert("RGB"), (x, 0))
        draw_label(pair, label, (x + 6, 6), "la", 12)
    return pair


def crop_picture(photo: Image.Image, soft_map) -> Image.Image:
    """The crop rule on the soft-inpainting map: the box of the released cells, grown by the margin; beside it the
    photo, dimmed where the result is the input's own pixels."""
    from SD2.diff_pipe import map_on_grid, map_to_tensor, release_steps  # the rule itself, as the pipelines run it
    from tools.crop import change_box

    grid = (photo.height // CROP_SCALE, photo.width // CROP_SCALE)
    release = release_steps(map_on_grid(map_to_tensor(soft_map, complement=True), grid), CROP_STEPS)
    boxes = [change_box(release, CROP_STEPS, margin // CROP_SCALE, 1) for margin in (0, CROP_MARGIN)]
    panels = [_preview(np.asarray(soft_map)).convert("RGB"), _preview(photo.convert("RGB"))]
    to_preview = panels[0].width / grid[1]
    released, crop = ([round(side * to_preview) for side in (left, top, right, bottom)]
                      for top, left, bottom, right in boxes)
    inside = panels[1].crop(crop)
    panels[1] = panels[1].point(lambda value: value * 2 // 5)
    panels[1].paste(inside, crop[:2])
    for panel in panels:
        ImageDraw.Draw(panel).rectangle(crop, outline=(0, 200, 255), width=2)
    ImageDraw.Draw(panels[0]).rectangle(released, outline=(255, 140, 0), width=2)
    labels = ("released cells (orange), crop (blue)", f"--crop-margin {CROP_MARGIN}: edited inside")
    return _side_by_side(*panels, labels)


def release_picture(soft_map) -> Image.Image:
    """What an edit model does with the soft-inpainting map, step by step: white where a pixel runs free at that
    step (the mask FLUX.1 Fill reads; the pixels the instruction editors let change), by the flow rule the pipelines
    run, on the 16 px tokens of FLUX.1."""
    from Flux.diff_pipe_kontext import map_on_grid, map_to_tensor, release_steps

    keep = np.asarray(soft_map, np.float32)
    grid = (keep.shape[0] // 16, keep.shape[1] // 16)
    release = release_steps(map_on_grid(map_to_tensor(keep, complement=True), grid), RELEASE_STEPS)[0, 0].numpy()
    panels = [_preview(keep)] + [
        _preview(Image.fromarray(((release <= step) * 255).astype(np.uint8)).resize(soft_map.size))
        for step in RELEASE_SHOWN]
    return _strip(panels, ["map", *(f"step {step} of {RELEASE_STEPS}" for step in RELEASE_SHOWN)])


def fade_picture(keep_map: np.ndarray) -> Image.Image:
    """`python -m tools.maps fade` on a still map: the maps of a few frames of the fade, by the maker itself."""
    first, last = FADE
    faded = fade_maps(keep_map, FADE_FRAMES, FADE)
    labels = [f"frame {k}: strength x {min(max((k - first) / (last - first), 0), 1):g}" for k in FADE_SHOWN]
    return _strip([_preview(faded[k]) for k in FADE_SHOWN], labels)


def _strip(panels: list[Image.Image], labels: list[str]) -> Image.Image:
    """Previews in a row, 4 px apart, each labelled at its top left."""
    strip = Image.new("RGB", (sum(panel.width + 4 for panel in panels) - 4, panels[0].height), (32, 32, 32))
    for index, (panel, label) in enumerate(zip(panels, labels)):
        strip.paste(panel.convert("RGB"), (index * (panel.width + 4), 0))
        draw_label(strip, label, (index * (panel.width + 4) + 6, 6), "la", 12)
    return strip


def doc_images(photo: Image.Image) -> dict[str, Image.Image]:
    """The pictures by file name, for the example photo."""
    size = width, height = photo.size
    mask = Image.fromarray(inpaint_mask(size))
    soft_map = cli.mask_to_keep_map(mask, size, INPAINT_FEATHER_PX, INPAINT_GROW_PX)
    gradient = linear_gradient(width, height)
    bins = np.minimum(np.floor((1 - gradient) * ADHERENCE_BINS + 1e-9), ADHERENCE_BINS - 1)
    binned = 1 - (bins + 0.5) / ADHERENCE_BINS  # each pixel shown at its bin's middle strength
    strengths = [round(k / 10, 1) for k in range(11)]
    regions = region_map(region_labels(size), REGION_STRENGTHS)
    return {
        "map_gradient.png": _preview(gradient),
        "map_radial.png": _preview(radial(width, height, inner_radius=60, outer_radius=220)),
        "map_regions.png": _preview(regions),
        "soft_inpaint.png": _side_by_side(
            _preview(mask.convert("L")), _preview(np.asarray(soft_map)),
            ("--mask (white = fill)", f"map: --feather {INPAINT_FEATHER_PX} --grow {INPAINT_GROW_PX}"),
        ),
        "fan_map.png": label_fan(_preview(strength_fan(width, height, 8)).convert("RGB"), 8),
        "sweep_maps.png": sweep_grid(
            [uniform_map((SWEEP_TILE, SWEEP_TILE), s).point(lambda v: v * 255).convert("L") for s in strengths],
            strengths, columns=6,
        ),
        "adherence_bins.png": _preview(binned),
        "crop_to_change.png": crop_picture(photo, soft_map),
        "edit_release.png": release_picture(soft_map),
        "video_fade.png": fade_picture(regions),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.make_doc_images", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOC_IMAGES, help="folder to write into (default: docs/images/)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with Image.open(cli.EXAMPLE_IMAGE) as photo:
        pictures = doc_images(photo)
    for name, picture in pictures.items():
        picture.save(args.out / name, optimize=True)
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
