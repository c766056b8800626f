"""`crop_to_change`: the edit runs on the smallest crop that holds every released pixel, and is pasted into the input.

The rule (design: crop mode): the bounding box of the released latent cells, over every item of the batch, grows by
the margin on each side, then evenly to whole size units, and moves inside the grid where it would leave it. Each
family below is checked for the same contract: pixels outside the crop are the input's own, the denoiser sees only
the crop, and the result inside equals running the pipeline by hand on the cropped image and map.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import (
    build_pipeline,
    kandinsky_decoder_components,
    sd_components,
    sdxl_components,
    seeded_generator,
    test_image,
)

from benchmarks.harness import denoiser
from Kandinsky.diff_pipe import KandinskyV22DiffImg2ImgPipeline
from SD2.diff_pipe import StableDiffusionDiffImg2ImgPipeline, change_box, upscaled_size
from SDXL.diff_pipe import StableDiffusionXLDiffImg2ImgPipeline

PROMPT = "a red apple on a table"
STEPS = 3
SIZE = 64  # test images are 64 x 64 pixels


@dataclass
class Family:
    build: Callable  # () -> pipeline
    scale: int  # pixels per cell of the working grid
    unit: int  # the model's size unit, in pixels
    grid_of: Callable  # the denoiser's input tensor -> (rows, columns) of working-grid cells it covers
    call_arguments: dict  # what every call of the tests passes besides image, map and generator
    native_grid: int  # the side of the model's native size, in working-grid cells
    # what a call of `count` images passes besides images, maps and generators: by default a prompt per image
    batched: Callable = lambda arguments, count: dict(arguments, prompt=[arguments["prompt"]] * count)

    def working_image(self, pipe, image):
        """The input as the pipeline sees it: the working pixel grid, in [0, 1]."""
        return pipe.image_processor.preprocess(image) / 2 + 0.5


FAMILIES = {
    "sd2": Family(
        build=lambda: build_pipeline(StableDiffusionDiffImg2ImgPipeline, sd_components()),
        scale=2, unit=2, grid_of=lambda latents: tuple(latents.shape[-2:]),
        call_arguments=dict(prompt=PROMPT), native_grid=32,  # sample_size: 64 px, well above the 16 px crop
    ),
    "sdxl": Family(
        build=lambda: build_pipeline(StableDiffusionXLDiffImg2ImgPipeline, sdxl_components()),
        scale=2, unit=2, grid_of=lambda latents: tuple(latents.shape[-2:]),
        call_arguments=dict(prompt=PROMPT), native_grid=32,
    ),
    "kandinsky": Family(
        build=lambda: build_pipeline(KandinskyV22DiffImg2ImgPipeline, kandinsky_decoder_components()),
        scale=2, unit=4,  # pixel_multiple: 2 px per MoVQ latent, and one halving in the UNet
        grid_of=lambda latents: tuple(latents.shape[-2:]),
        # No text: stand-ins for the prior's image embeddings. height=width=None keeps each image's own size, so
        # that a crop run by hand is edited as it is.
        call_arguments=dict(image_embeds=torch.randn(1, 32, generator=seeded_generator(1)),
                            negative_image_embeds=torch.randn(1, 32, generator=seeded_generator(2)),
                            height=None, width=None),
        native_grid=32,
        batched=lambda arguments, count: dict(arguments, **{
            name: arguments[name].repeat(count, 1) for name in ("image_embeds", "negative_image_embeds")}),
    ),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def pipe(family):
    return FAMILIES[family].build()


def block_map(top, left, bottom, right, size=SIZE):
    """Changes the block (strength 1) and keeps the rest of the frame."""
    keep_map = np.ones((size, size), np.float32)
    keep_map[top:bottom, left:right] = 0
    return keep_map


def run(pipe, family, image, map, seed=0, **options):
    """One image, or a batch (a list, or a 4-D tensor) with a prompt and a generator per image."""
    arguments = dict(FAMILIES[family].call_arguments, generator=seeded_generator(seed))
    count = len(image) if isinstance(image, list) else len(image) if isinstance(image, torch.Tensor) else 1
    if count > 1:
        arguments = dict(FAMILIES[family].batched(arguments, count),
                         generator=[seeded_generator(seed + k) for k in range(count)])
    return pipe(**arguments, image=image, map=map, num_inference_steps=STEPS, **options).images


class DenoiserGrids(list):
    """The working-grid size of every denoiser call, while in a `with` block."""

    def __init__(self, pipe, family):
        super().__init__()
        self.model, self.grid_of = denoiser(pipe), FAMILIES[family].grid_of

    def __enter__(self):
        self.hook = self.model.register_forward_pre_hook(
            lambda module, args, kwargs: self.append(self.grid_of((args or list(kwargs.values()))[0])),
            with_kwargs=True,
        )
        return self

    def __exit__(self, *error):
        self.hook.remove()


def expected_box(first, last, margin, unit, size):
    """One side of the rule, written out: the released cells first..last (inclusive), in pixels."""
    start, stop = max(0, first - margin), min(size, last + 1 + margin)
    length = min(size, -(-(stop - start) // unit) * unit)
    start = min(max(0, start - (length - (stop - start)) // 2), size - length)
    return start, start + length


def by_hand(pipe, family, working, keep_map, box, seed=0, **options):
    """The pipeline run on the cropped working image and map, as a user would crop them."""
    top, left, bottom, right = box
    crop = working[..., top:bottom, left:right]
    crop_map = torch.as_tensor(keep_map)[..., top:bottom, left:right]
    return run(pipe, family, crop, crop_map, seed=seed, output_type="np", **options)


# ---------------------------------------------------------------------------------------------------------------
# The rule itself


def test_the_box_grows_by_the_margin_rounds_to_units_and_stays_inside_the_grid():
    release = torch.full((1, 1, 20, 30), 10)
    release[0, 0, 5:7, 12:15] = 3  # rows 5-6, columns 12-14 released
    assert change_box(release, 10, margin=0, unit=1) == (5, 12, 7, 15)
    assert change_box(release, 10, margin=2, unit=1) == (3, 10, 9, 17)
    # 6 rows and 7 columns grow to 8 each, one cell either side where that is even, the extra cell after.
    assert change_box(release, 10, margin=2, unit=4) == (2, 10, 10, 18)
    # At an edge the box moves inside rather than shrinking: columns 11-29 (19) round up to 20 ending at the edge.
    # One as large as the grid is the grid.
    release[0, 0, 0, 29] = 9
    assert change_box(release, 10, margin=1, unit=4) == (0, 10, 8, 30)
    assert change_box(release, 10, margin=30, unit=4) == (0, 0, 20, 30)


def test_the_box_covers_every_item_and_nothing_released_is_no_box():
    release = torch.full((2, 1, 8, 8), 5)
    assert change_box(release, 5, margin=1, unit=1) is None
    release[0, 0, 1, 1] = 0
    release[1, 0, 6, 4] = 4
    assert change_box(release, 5, margin=0, unit=1) == (1, 1, 7, 5)


def test_the_upscaled_size_keeps_the_aspect_ratio_at_the_native_area_and_never_shrinks():
    assert upscaled_size(64, 64, 512, 8) == (512, 512)
    assert upscaled_size(32, 128, 512, 8) == (256, 1024)
    assert upscaled_size(1024, 1024, 512, 8) == (1024, 1024)


# ---------------------------------------------------------------------------------------------------------------
# The contract, per family


@pytest.mark.parametrize("margin", [0, 6])
def test_a_corner_change_is_edited_on_its_crop_alone_and_pasted_into_the_input(pipe, family, margin):
    spec = FAMILIES[family]
    image, keep_map = test_image(), block_map(4, 40, 20, 60)
    cells = [(first // spec.scale, (last + 1) // spec.scale - 1) for first, last in ((4, 19), (40, 59))]
    margin_cells, unit_cells, grid = -(-margin // spec.scale), spec.unit // spec.scale, SIZE // spec.scale
    (top, bottom), (left, right) = (
        tuple(side * spec.scale for side in expected_box(first, last, margin_cells, unit_cells, grid))
        for first, last in cells
    )
    with DenoiserGrids(pipe, family) as grids:
        result = run(pipe, family, image, keep_map, crop_to_change=True, crop_margin=margin)[0]
    crop_grid = ((bottom - top) // spec.scale, (right - left) // spec.scale)
    assert grids and set(grids) == {crop_grid}
    assert len(grids) % STEPS == 0
    outside = np.ones((SIZE, SIZE), bool)
    outside[top:bottom, left:right] = False
    assert result.size == image.size
    np.testing.assert_array_equal(np.asarray(result)[outside], np.asarray(image)[outside])
    assert not np.array_equal(np.asarray(result)[~outside], np.asarray(image)[~outside])

    working = spec.working_image(pipe, image)
    inside = run(pipe, family, image, keep_map, crop_to_change=True, crop_margin=margin, output_type="np")[0]
    expected = by_hand(pipe, family, working, keep_map, (top, left, bottom, right))[0]
    np.testing.assert_array_equal(inside[top:bottom, left:right], expected)


def test_a_batch_is_edited_on_the_union_of_its_changes(pipe, family):
    spec = FAMILIES[family]
    images = [test_image(seed=1), test_image(seed=2)]
    keep_maps = np.stack([block_map(8, 8, 16, 16), block_map(40, 24, 48, 32)])
    box = (8, 8, 48, 32)  # margin 0, and both blocks lie on whole units
    with DenoiserGrids(pipe, family) as grids:
        batched = run(pipe, family, images, keep_maps, crop_to_change=True, crop_margin=0, output_type="np")
    assert set(grids) == {(40 // spec.scale, 24 // spec.scale)}
    working = torch.cat([spec.working_image(pipe, image) for image in images])
    expected = by_hand(pipe, family, working, keep_maps, box)
    np.testing.assert_array_equal(batched[:, 8:48, 8:32], expected)
    for item, image in enumerate(images):
        outside = np.ones((SIZE, SIZE), bool)
        outside[8:48, 8:32] = False
        np.testing.assert_allclose(batched[item][outside], np.asarray(image)[outside] / 255, atol=1e-6)


def test_a_map_that_releases_nothing_returns_the_input_without_a_step(pipe, family):
    image = test_image()
    with DenoiserGrids(pipe, family) as grids:
        result = run(pipe, family, image, np.ones((SIZE, SIZE), np.float32), crop_to_change=True)[0]
    assert grids == []
    np.testing.assert_array_equal(np.asarray(result), np.asarray(image))


def test_crop_upscale_edits_the_crop_at_the_native_size_and_keeps_the_rest_exact(pipe, family):
    spec = FAMILIES[family]
    image, keep_map = test_image(), block_map(24, 24, 40, 40)
    keep_map[28:36, 28:36] = 0.5  # a softer centre, to check that its map is carried along
    with DenoiserGrids(pipe, family) as grids:
        result = run(pipe, family, image, keep_map, crop_to_change=True, crop_margin=0, crop_upscale=True,
                     keep_exact=True)[0]
    assert set(grids) == {(spec.native_grid, spec.native_grid)}
    outside = np.ones((SIZE, SIZE), bool)
    outside[24:40, 24:40] = False
    np.testing.assert_array_equal(np.asarray(result)[outside], np.asarray(image)[outside])
    assert not np.array_equal(np.asarray(result)[24:40, 24:40], np.asarray(image)[24:40, 24:40])


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(output_type="latent"), 'an `output_type` other than "latent"'),
        (dict(crop_margin=-1), "`crop_margin` must be a whole number of pixels, 0 or more, not -1"),
        (dict(crop_margin=2.5), "`crop_margin` must be a whole number of pixels, 0 or more, not 2.5"),
    ],
)
def test_bad_crop_arguments_are_refused_clearly(pipe, family, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(pipe, family, test_image(), block_map(0, 0, 8, 8), crop_to_change=True, **options)


# ---------------------------------------------------------------------------------------------------------------
# What one family does differently


@pytest.fixture(scope="module")
def sdxl_pipe():
    return FAMILIES["sdxl"].build()


@pytest.mark.parametrize(
    "options, named",
    [
        (dict(denoising_end=0.8, output_type="latent"), "`denoising_end`"),
        (dict(denoising_start=0.8), "`denoising_start`, latents as `image`"),
        (dict(latents=torch.zeros(1, 4, 32, 32)), "`latents`"),
        (dict(noise=torch.zeros(1, 4, 32, 32)), "`noise`"),
    ],
)
def test_sdxl_refuses_to_crop_one_stage_of_base_and_refiner(sdxl_pipe, options, named):
    image = torch.zeros(1, 4, 32, 32) if "denoising_start" in options else test_image()
    with pytest.raises(ValueError, match=f"`crop_to_change` runs the whole schedule .* takes no {named}: .*"
                                         "`base.crop_and_paste`"):
        run(sdxl_pipe, "sdxl", image, block_map(0, 0, 8, 8), crop_to_change=True, **options)


def test_sdxl_conditions_the_crop_on_its_own_size(sdxl_pipe):
    time_ids = []
    hook = sdxl_pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: time_ids.append(kwargs["added_cond_kwargs"]["time_ids"]), with_kwargs=True
    )
    try:
        run(sdxl_pipe, "sdxl", test_image(), block_map(4, 40, 20, 60), crop_to_change=True, crop_margin=0)
    finally:
        hook.remove()
    # (original size, crop coordinates, target size) of a 16 x 20 image given alone, as by hand; twice for guidance
    assert all(ids.tolist() == [[16, 20, 0, 0, 16, 20]] * 2 for ids in time_ids) and len(time_ids) == STEPS


def test_kandinsky_pastes_each_output_into_its_own_image_in_stock_order():
    pipe, spec = FAMILIES["kandinsky"].build(), FAMILIES["kandinsky"]
    images = [test_image(seed=1), test_image(seed=2)]
    arguments = spec.batched(spec.call_arguments, 2)
    # Stock orders outputs a, a, b, b for two images and num_images_per_prompt=2.
    result = pipe(**arguments, image=images, map=block_map(8, 8, 16, 16), num_images_per_prompt=2,
                  num_inference_steps=STEPS, generator=[seeded_generator(k) for k in range(4)], crop_to_change=True,
                  crop_margin=0, output_type="np").images
    outside = np.ones((SIZE, SIZE), bool)
    outside[8:16, 8:16] = False
    for output, image in zip(result, [images[0], images[0], images[1], images[1]]):
        np.testing.assert_allclose(output[outside], np.asarray(image)[outside] / 255, atol=1e-6)
    assert not np.array_equal(result[0][8:16, 8:16], result[1][8:16, 8:16])  # two draws of one image
