"""The crop benchmark's cases, shared by bench_crop.py (small models, CPU) and gpu_bench.py (published sizes, GPU):
soft-inpainting maps whose changed pixels cover AREAS of the frame, the crop that the rule gives for each, and the
whole-frame and cropped edits timed side by side.
"""

import math

import numpy as np
import torch

from benchmarks import harness
from tools.crop import change_box, edit_on_crop
from tools.feather import feathered_mask

AREAS = (0.05, 0.10, 0.25)  # the share of the frame whose strength is above 0
MARGIN = 32  # pixels of context around the change


def soft_inpainting_map(size: int, area: float) -> np.ndarray:
    """A keep map: a disc that changes fully, feathered by a quarter of its radius, off the frame's centre; the
    feathered disc (strength above 0) covers `area` of the frame."""
    outer = math.sqrt(area * size * size / math.pi)  # radius + feather
    radius = outer / 1.25
    y, x = np.mgrid[:size, :size] + 0.5
    disc = np.hypot(x - 0.4 * size, y - 0.45 * size) <= radius
    return feathered_mask(disc, feather_px=outer - radius)


def crop_cells(module, keep_map, scale: int, steps: int) -> tuple:
    """(rows, columns) of the crop that the rule gives for `keep_map`, and of the whole latent grid, in cells of
    `scale` pixels (the model's size unit: one cell, as for SD and SDXL)."""
    grid = tuple(side // scale for side in keep_map.shape)
    release = module.release_steps(module.map_on_grid(module.map_to_tensor(keep_map, complement=True), grid), steps)
    top, left, bottom, right = change_box(release, steps, -(-MARGIN // scale), 1)
    return (bottom - top, right - left), grid


def crop_share(module, pipe, keep_map, steps: int) -> float:
    """The share of the frame that the crop rule gives for `keep_map`."""
    (rows, columns), grid = crop_cells(module, keep_map, pipe.vae_scale_factor, steps)
    return rows * columns / (grid[0] * grid[1])


def crop_cases(pipe, keep_map, **call) -> dict:
    """The whole-frame edit with `keep_map` and the cropped one (MARGIN px of context), as functions of no arguments
    that draw from a freshly seeded generator: "whole frame" first, the baseline of `harness.side_by_side`."""

    def whole_frame():
        return pipe(map=keep_map, generator=torch.Generator().manual_seed(harness.SEED), **call)

    def crop():
        return edit_on_crop(pipe, MARGIN, map=keep_map, generator=torch.Generator().manual_seed(harness.SEED), **call)

    return {"whole frame": whole_frame, "crop": crop}
