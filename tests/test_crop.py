"""`tools.crop.edit_on_crop`: the edit runs on the smallest crop that holds every released pixel, and is pasted into
the input.

The rule (design: crop mode): the bounding box of the released latent cells, over every item of the batch, grows by
the margin on each side, then evenly to whole size units, and moves inside the grid where it would leave it. Each
family below is checked for the same contract: pixels outside the crop are the input's own, the denoiser sees only
the crop, and the result inside equals running the pipeline by hand on the cropped image and map.
"""

import inspect
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    IF_STAGE1_SIZE,
    build_pipeline,
    if_stage1_components,
    if_stage2_components,
    kandinsky_decoder_components,
    sd_components,
    sdxl_components,
    seeded_generator,
    test_image,
)
from flow_models import flux_components, sd3_components
from flow_models2 import chroma_components, qwenimage_components, zimage_components

from benchmarks.harness import denoiser
from Chroma.diff_pipe import ChromaDiffImg2ImgPipeline
from Flux.diff_pipe import FluxDiffImg2ImgPipeline
from IF.diff_pipe_I import IFDiffImg2ImgPipeline
from IF.diff_pipe_II import IFDiffImg2ImgSuperResolutionPipeline
from Kandinsky.diff_pipe import KandinskyV22DiffImg2ImgPipeline
from QwenImage.diff_pipe import QwenImageDiffImg2ImgPipeline
from SD2.diff_pipe import StableDiffusionDiffImg2ImgPipeline
from SD3.diff_pipe import StableDiffusion3DiffImg2ImgPipeline
from SD2.diff_pipe_controlnet import StableDiffusionControlNetDiffImg2ImgPipeline
from SD2.diff_pipe_inpaint import StableDiffusionDiffInpaintPipeline
from SDXL.diff_pipe import StableDiffusionXLDiffImg2ImgPipeline
from SDXL.diff_pipe_controlnet import StableDiffusionXLControlNetDiffImg2ImgPipeline
from SDXL.diff_pipe_inpaint import StableDiffusionXLDiffInpaintPipeline
from tools.crop import change_box, edit_on_crop, upscaled_size
from tests.tiny_models import (
    sd_controlnet_components,
    sd_inpaint_components,
    sdxl_controlnet_components,
    sdxl_inpaint_components,
)
from ZImage.diff_pipe import ZImageDiffImg2ImgPipeline

PROMPT = "a red apple on a table"
BATCH_RTOL = 1e-4  # the same items in another batch layout: float32 sums in another order (see tests/test_contract.py)
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
    grid_input: str = None  # the denoiser's keyword input that grid_of reads (default: its first input)
    preprocess: Callable = lambda pipe, image: pipe.image_processor.preprocess(image)  # -> [-1, 1] working pixels
    image_argument: str = "image"  # the argument that takes the image being edited
    to_input: Callable = lambda crop: crop  # a [0, 1] crop of the working image -> what `image_argument` takes
    # IF stage II: (count, box) -> its `image` argument, the stage I results; cut by hand for `box` when given.
    conditioning: Callable = None
    copies_adjacent: bool = False  # num_images_per_prompt copies come out as a, a, b, b (IF) rather than a, b, a, b
    # box -> arguments that crop mode cuts alike (a ControlNet's control image): cut by hand for `box` when given.
    cut_arguments: Callable = None
    # what a call of `count` images passes besides images, maps and generators: by default a prompt per image
    batched: Callable = lambda arguments, count: dict(arguments, prompt=[arguments["prompt"]] * count)

    def working_image(self, pipe, image):
        """The input as the pipeline sees it: the working pixel grid, in [0, 1]."""
        return self.preprocess(pipe, image) / 2 + 0.5


def stage1_results(count, box=None):
    """Stage II's `image`: `count` stage I results of 32 px. For `box`, cut as a user cuts the working image: on
    stage II's grid (upscaled as stock upscales it), in [0, 1], then handed over in [-1, 1] as IF takes tensors."""
    low_res = torch.stack([torch.from_numpy(np.asarray(test_image(IF_STAGE1_SIZE, seed=10 + k), np.float32))
                           for k in range(count)]).permute(0, 3, 1, 2) / 127.5 - 1
    if box is None:
        return low_res
    top, left, bottom, right = box
    upscaled = F.interpolate(low_res, (SIZE, SIZE), mode="bilinear", align_corners=True) / 2 + 0.5
    return upscaled[..., top:bottom, left:right] * 2 - 1


# IF works in pixels: one working-grid cell is one pixel. The tiny UNets halve the image once: the unit is 8 px,
# the multiple stock IF resizes to. Both stages are built at 64 px, so the 64 px test image is their working grid.
IF_ARGUMENTS = dict(prompt=PROMPT, clean_caption=False)  # caption cleaning needs bs4 and ftfy
IF_INPUT = dict(scale=1, unit=8, grid_of=lambda images: tuple(images.shape[-2:]), native_grid=64,
                to_input=lambda crop: crop * 2 - 1)


def control_image(box):
    """A condition unlike the image, whole or as its cut for a crop made by hand (pixels in [0, 1])."""
    condition = test_image(seed=7).transpose(0)
    if box is None:
        return dict(control_image=condition)
    top, left, bottom, right = box
    pixels = torch.from_numpy(np.asarray(condition, np.float32) / 255).permute(2, 0, 1)[None]
    return dict(control_image=pixels[..., top:bottom, left:right])


FAMILIES = {
    "sd2": Family(
        build=lambda: build_pipeline(StableDiffusionDiffImg2ImgPipeline, sd_components()),
        scale=2, unit=2, grid_of=lambda latents: tuple(latents.shape[-2:]),
        call_arguments=dict(prompt=PROMPT), native_grid=32,  # sample_size: 64 px, well above the 16 px crop
    ),
    "if_stage1": Family(
        build=lambda: build_pipeline(IFDiffImg2ImgPipeline, if_stage1_components(sample_size=SIZE)),
        call_arguments=IF_ARGUMENTS, preprocess=lambda pipe, image: pipe.preprocess_image(image), **IF_INPUT,
        copies_adjacent=True,
    ),
    "if_stage2": Family(
        build=lambda: build_pipeline(IFDiffImg2ImgSuperResolutionPipeline, if_stage2_components(sample_size=SIZE)),
        call_arguments=IF_ARGUMENTS, preprocess=lambda pipe, image: pipe.preprocess_original_image(image),
        image_argument="original_image", conditioning=stage1_results, copies_adjacent=True, **IF_INPUT,
    ),
    "sd2_controlnet": Family(
        build=lambda: build_pipeline(StableDiffusionControlNetDiffImg2ImgPipeline, sd_controlnet_components()),
        scale=2, unit=2, grid_of=lambda latents: tuple(latents.shape[-2:]),
        call_arguments=dict(prompt=PROMPT), native_grid=32, cut_arguments=control_image,
    ),
    "sdxl_controlnet": Family(
        build=lambda: build_pipeline(StableDiffusionXLControlNetDiffImg2ImgPipeline, sdxl_controlnet_components()),
        scale=2, unit=2, grid_of=lambda latents: tuple(latents.shape[-2:]),
        call_arguments=dict(prompt=PROMPT), native_grid=32, cut_arguments=control_image,
    ),
    "sd2_inpaint": Family(
        build=lambda: build_pipeline(StableDiffusionDiffInpaintPipeline, sd_inpaint_components()),
        scale=2, unit=8, grid_of=lambda latents: tuple(latents.shape[-2:]),
        call_arguments=dict(prompt=PROMPT), native_grid=32,
    ),
    "sdxl_inpaint": Family(
        build=lambda: build_pipeline(StableDiffusionXLDiffInpaintPipeline, sdxl_inpaint_components()),
        scale=2, unit=8, grid_of=lambda latents: tuple(latents.shape[-2:]),
        call_arguments=dict(prompt=PROMPT), native_grid=32,
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
        copies_adjacent=True,
    ),
}


def flow_pipeline(pipeline_class, components):
    """A tiny flow pipeline whose native size is 64 px, 32 latents a side, as its tests' images (stock's 128 latents
    are the real models' 1024 px: 256 px at this VAE's factor of 2)."""
    pipe = build_pipeline(pipeline_class, components)
    pipe.default_sample_size = 32
    return pipe


def packed_grid(image_ids):
    """The latent grid of Flux and Chroma tokens from their (row, column) ids: each token is a 2x2 patch."""
    return tuple(2 * (int(image_ids[:, axis].max()) + 1) for axis in (1, 2))


# The flow families' tiny models share the VAE factor 2, and each rounds sizes to 4 px: 2x2 patches of latents.
FLOW_CALL = dict(prompt=PROMPT, max_sequence_length=32)
FAMILIES.update(
    sd3=Family(
        build=lambda: build_pipeline(StableDiffusion3DiffImg2ImgPipeline, sd3_components()),
        scale=2, unit=4, grid_of=lambda latents: tuple(latents.shape[-2:]),
        call_arguments=FLOW_CALL, native_grid=32,  # the transformer's sample_size
    ),
    flux=Family(
        build=lambda: flow_pipeline(FluxDiffImg2ImgPipeline, flux_components()),
        scale=2, unit=4, grid_of=packed_grid, grid_input="img_ids", call_arguments=FLOW_CALL, native_grid=32,
    ),
    chroma=Family(
        build=lambda: flow_pipeline(ChromaDiffImg2ImgPipeline, chroma_components()),
        scale=2, unit=4, grid_of=packed_grid, grid_input="img_ids", call_arguments=FLOW_CALL, native_grid=32,
    ),
    qwenimage=Family(
        build=lambda: flow_pipeline(QwenImageDiffImg2ImgPipeline, qwenimage_components()),
        scale=2, unit=4, grid_of=lambda shapes: (2 * shapes[0][0][1], 2 * shapes[0][0][2]), grid_input="img_shapes",
        call_arguments=FLOW_CALL, native_grid=32,
    ),
    zimage=Family(  # its transformer takes a list of (C, 1, H, W) latents
        build=lambda: flow_pipeline(ZImageDiffImg2ImgPipeline, zimage_components()),
        scale=2, unit=4, grid_of=lambda latents: tuple(latents[0].shape[-2:]), call_arguments=FLOW_CALL,
        native_grid=32,
    ),
)


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


def run(pipe, family, image, map, seed=0, box=None, **options):
    """One image, or a batch (a list, or a 4-D tensor) with a prompt and a generator per image. `box`: the crop
    that `image` was cut by hand from the working image."""
    spec = FAMILIES[family]
    arguments = dict(spec.call_arguments, generator=seeded_generator(seed))
    count = len(image) if isinstance(image, list) else len(image) if isinstance(image, torch.Tensor) else 1
    if count > 1:
        arguments = dict(FAMILIES[family].batched(arguments, count),
                         generator=[seeded_generator(seed + k) for k in range(count)])
    if spec.conditioning is not None:
        arguments["image"] = spec.conditioning(count, box)
    if spec.cut_arguments is not None:
        arguments.update(spec.cut_arguments(box))
    arguments[spec.image_argument] = image
    output = pipe(**{**arguments, **options}, map=map, num_inference_steps=STEPS)
    return output.images if hasattr(output, "images") else output


def cropped(pipe, family, image, map, margin=0, upscale=False, seed=0, **options):
    """`run` through the crop: (images, box)."""
    return run(lambda **call: edit_on_crop(pipe, margin, upscale, **call), family, image, map, seed, **options)


class DenoiserGrids(list):
    """The working-grid size of every denoiser call, while in a `with` block."""

    def __init__(self, pipe, family):
        super().__init__()
        self.model, self.spec = denoiser(pipe), FAMILIES[family]

    def __enter__(self):
        def record(module, args, kwargs):
            grid_input = kwargs[self.spec.grid_input] if self.spec.grid_input else (args or list(kwargs.values()))[0]
            self.append(self.spec.grid_of(grid_input))

        self.hook = self.model.register_forward_pre_hook(record, with_kwargs=True)
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
    crop = FAMILIES[family].to_input(working[..., top:bottom, left:right])
    crop_map = torch.as_tensor(keep_map)[..., top:bottom, left:right]
    if "height" in inspect.signature(pipe.__call__).parameters:  # the crop's own size, not the pipeline's default
        options = dict(options, height=bottom - top, width=right - left)
    return run(pipe, family, crop, crop_map, seed=seed, box=box, output_type="np", **options)


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


def test_the_upscaled_size_of_sides_that_are_not_whole_units():
    # A side that reaches the grid's edge keeps the grid's length, which need not be a whole unit.
    assert upscaled_size(30, 50, 512, 8) == (400, 664)
    assert upscaled_size(97, 97, 98, 8) == (104, 104)  # 98 px rounds to 96, smaller than the crop: the next unit up
    assert upscaled_size(1001, 1003, 512, 8) == (1001, 1003)  # at least native already: edited as it is


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
    assert (pipe.crop_unit, pipe.native_size) == (spec.unit, spec.native_grid * spec.scale)
    with DenoiserGrids(pipe, family) as grids:
        results, box = cropped(pipe, family, image, keep_map, margin)
    assert box == (top, left, bottom, right)
    result = results[0]
    crop_grid = ((bottom - top) // spec.scale, (right - left) // spec.scale)
    assert grids and set(grids) == {crop_grid}
    assert len(grids) % STEPS == 0
    outside = np.ones((SIZE, SIZE), bool)
    outside[top:bottom, left:right] = False
    assert result.size == image.size
    np.testing.assert_array_equal(np.asarray(result)[outside], np.asarray(image)[outside])
    assert not np.array_equal(np.asarray(result)[~outside], np.asarray(image)[~outside])

    working = spec.working_image(pipe, image)
    inside = cropped(pipe, family, image, keep_map, margin, output_type="np")[0][0]
    expected = by_hand(pipe, family, working, keep_map, (top, left, bottom, right))[0]
    np.testing.assert_array_equal(inside[top:bottom, left:right], expected)


@pytest.mark.parametrize("images_per_prompt", [1, 2])
def test_a_batch_is_edited_on_the_union_of_its_changes(pipe, family, images_per_prompt):
    spec = FAMILIES[family]
    images = [test_image(seed=1), test_image(seed=2)]
    keep_maps = np.stack([block_map(8, 8, 16, 16), block_map(40, 24, 48, 32)])
    box = (8, 8, 48, 32)  # margin 0, and both blocks lie on whole units

    def options():  # several images per prompt: a, b, a, b (the batch repeated whole), or a, a, b, b (IF)
        return {} if images_per_prompt == 1 else dict(num_images_per_prompt=2, generator=seeded_generator())

    with DenoiserGrids(pipe, family) as grids:
        batched, _ = cropped(pipe, family, images, keep_maps, output_type="np", **options())
    assert set(grids) == {(40 // spec.scale, 24 // spec.scale)}
    working = torch.cat([spec.working_image(pipe, image) for image in images])
    expected = by_hand(pipe, family, working, keep_maps, box, **options())
    assert len(batched) == len(expected) == 2 * images_per_prompt
    np.testing.assert_array_equal(batched[:, 8:48, 8:32], expected)
    for item, output in enumerate(batched):
        outside = np.ones((SIZE, SIZE), bool)
        outside[8:48, 8:32] = False
        source = images[item // images_per_prompt if spec.copies_adjacent else item % 2]
        np.testing.assert_allclose(output[outside], np.asarray(source)[outside] / 255, atol=1e-6)


def test_copies_of_one_image_are_each_pasted_into_it(pipe, family):
    image, keep_map = test_image(), block_map(8, 8, 24, 24)
    copies, _ = cropped(pipe, family, image, keep_map, num_images_per_prompt=2, output_type="np")
    assert len(copies) == 2 and not np.array_equal(copies[0], copies[1])  # two draws of the noise
    outside = np.ones((SIZE, SIZE), bool)
    outside[8:24, 8:24] = False
    for copy in copies:
        np.testing.assert_allclose(copy[outside], np.asarray(image)[outside] / 255, atol=1e-6)


def test_the_crop_holds_every_pixel_the_family_releases(pipe, family):
    # Strength 0.4 / T in one corner: flow-matching img2img runs ceil(0.4) = 1 step there, SD and the others none.
    spec = FAMILIES[family]
    keep_map = block_map(0, 0, 16, 16)
    keep_map[48:64, 48:64] = 1 - 0.4 / STEPS
    with DenoiserGrids(pipe, family) as grids:
        cropped(pipe, family, test_image(), keep_map, output_type="np")
    flow = family in ("sd3", "flux", "chroma", "qwenimage", "zimage")
    side = SIZE if flow else max(16, spec.unit)
    assert set(grids) == {(side // spec.scale, side // spec.scale)}


def test_a_map_that_releases_nothing_returns_the_input_without_a_step(pipe, family):
    image = test_image()
    with DenoiserGrids(pipe, family) as grids:
        results, box = cropped(pipe, family, image, np.ones((SIZE, SIZE), np.float32), margin=32)
    assert grids == [] and box is None
    result = results[0]
    np.testing.assert_array_equal(np.asarray(result), np.asarray(image))


def test_crop_upscale_edits_the_crop_at_the_native_size_and_keeps_the_rest_exact(pipe, family):
    spec = FAMILIES[family]
    image, keep_map = test_image(), block_map(24, 24, 40, 40)
    keep_map[28:36, 28:36] = 0.5  # a softer centre, to check that its map is carried along
    with DenoiserGrids(pipe, family) as grids:
        result = cropped(pipe, family, image, keep_map, upscale=True, keep_exact=True)[0][0]
    assert set(grids) == {(spec.native_grid, spec.native_grid)}
    outside = np.ones((SIZE, SIZE), bool)
    outside[24:40, 24:40] = False
    np.testing.assert_array_equal(np.asarray(result)[outside], np.asarray(image)[outside])
    assert not np.array_equal(np.asarray(result)[24:40, 24:40], np.asarray(image)[24:40, 24:40])


@pytest.mark.parametrize("family", ["sd2"], indirect=True)
def test_keep_exact_on_a_crop_at_its_own_size_keeps_the_input_bytes_inside_the_crop_too(pipe, family):
    # The crop's margin holds kept pixels that the model saw: keep_exact must reach the crop call for them.
    image, keep_map = test_image(), block_map(24, 24, 40, 40)
    result = np.asarray(cropped(pipe, family, image, keep_map, margin=8, keep_exact=True)[0][0])
    kept = keep_map == 1
    np.testing.assert_array_equal(result[kept], np.asarray(image)[kept])
    plain = np.asarray(cropped(pipe, family, image, keep_map, margin=8)[0][0])
    margin = kept.copy()
    margin[:16, :], margin[48:, :], margin[:, :16], margin[:, 48:] = False, False, False, False
    assert not np.array_equal(plain[margin], np.asarray(image)[margin])  # without it, the VAE's round trip shows
    np.testing.assert_array_equal(result[~kept], plain[~kept])


@pytest.mark.parametrize("family", ["if_stage1", "if_stage2"], indirect=True)
def test_if_pastes_the_copies_of_an_image_into_that_image(pipe, family):
    spec = FAMILIES[family]
    images = [test_image(seed=1), test_image(seed=2)]
    keep_maps = np.stack([block_map(8, 8, 16, 16), block_map(40, 24, 48, 32)])
    box = (8, 8, 48, 32)
    copies = dict(num_images_per_prompt=2, generator=[seeded_generator(k) for k in range(4)])
    batched, crop_box = cropped(pipe, family, images, keep_maps, output_type="np", **copies)
    assert crop_box == box
    working = torch.cat([spec.working_image(pipe, image) for image in images])
    copies["generator"] = [seeded_generator(k) for k in range(4)]
    np.testing.assert_array_equal(batched[:, 8:48, 8:32], by_hand(pipe, family, working, keep_maps, box, **copies))
    outside = np.ones((SIZE, SIZE), bool)
    outside[8:48, 8:32] = False
    for row, image in zip(batched, [images[0], images[0], images[1], images[1]]):  # IF's order: copies side by side
        np.testing.assert_allclose(row[outside], np.asarray(image)[outside] / 255, atol=1e-6)
    assert cropped(pipe, family, images[0], np.ones((SIZE, SIZE), np.float32))[1] is None
    assert pipe.num_timesteps == 0


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(output_type="latent"), 'pass an `output_type` of "pil", "np" or "pt", not \'latent\''),
        (dict(margin=-1), "`margin` must be a whole number of pixels, 0 or more, not -1"),
        (dict(margin=2.5), "`margin` must be a whole number of pixels, 0 or more, not 2.5"),
        (dict(margin=True), "`margin` must be a whole number of pixels, 0 or more, not True"),
    ],
)
def test_bad_crop_arguments_are_refused_clearly(pipe, family, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cropped(pipe, family, test_image(), block_map(0, 0, 8, 8), **options)


@pytest.mark.parametrize("moved", ["crop_to_change", "crop_margin", "crop_upscale"])
def test_the_crop_arguments_that_left_the_pipeline_say_where_they_went(pipe, family, moved):
    with pytest.raises(TypeError, match=rf"^`{moved}` is no longer an argument of the pipeline: crop with "
                                        r"tools\.crop\.edit_on_crop\(pipe, margin=\.\.\., upscale="):
        run(pipe, family, test_image(), block_map(0, 0, 8, 8), **{moved: True})


# ---------------------------------------------------------------------------------------------------------------
# What one family does differently


@pytest.fixture(scope="module")
def sdxl_pipe():
    return FAMILIES["sdxl"].build()


@pytest.mark.parametrize(
    "options, named",
    [
        (dict(denoising_end=0.8, output_type="latent"), "`denoising_end`"),
        (dict(denoising_start=0.8), "`denoising_start`"),
        (dict(latents=torch.zeros(1, 4, 32, 32)), "`latents`"),
        (dict(noise=torch.zeros(1, 4, 32, 32)), "`noise`"),
    ],
)
def test_sdxl_refuses_to_crop_one_stage_of_base_and_refiner(sdxl_pipe, options, named):
    image = torch.zeros(1, 4, 32, 32) if "denoising_start" in options else test_image()
    with pytest.raises(ValueError, match=f"The crop runs the whole schedule .* takes no {named}: .* as `edit`"):
        cropped(sdxl_pipe, "sdxl", image, block_map(0, 0, 8, 8), **options)


def test_sdxl_conditions_the_crop_on_its_own_size(sdxl_pipe):
    time_ids = []
    hook = sdxl_pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: time_ids.append(kwargs["added_cond_kwargs"]["time_ids"]), with_kwargs=True
    )
    try:
        cropped(sdxl_pipe, "sdxl", test_image(), block_map(4, 40, 20, 60))
    finally:
        hook.remove()
    # (original size, crop coordinates, target size) of a 16 x 20 image given alone, as by hand; twice for guidance
    assert all(ids.tolist() == [[16, 20, 0, 0, 16, 20]] * 2 for ids in time_ids) and len(time_ids) == STEPS


def test_kandinsky_pastes_each_output_into_its_own_image_in_stock_order():
    pipe, spec = FAMILIES["kandinsky"].build(), FAMILIES["kandinsky"]
    images = [test_image(seed=1), test_image(seed=2)]
    arguments = spec.batched(spec.call_arguments, 2)
    # Stock orders outputs a, a, b, b for two images and num_images_per_prompt=2.
    result, _ = edit_on_crop(pipe, margin=0, **arguments, image=images, map=block_map(8, 8, 16, 16),
                             num_images_per_prompt=2, num_inference_steps=STEPS, output_type="np",
                             generator=[seeded_generator(k) for k in range(4)])
    outside = np.ones((SIZE, SIZE), bool)
    outside[8:16, 8:16] = False
    for output, image in zip(result, [images[0], images[0], images[1], images[1]]):
        np.testing.assert_allclose(output[outside], np.asarray(image)[outside] / 255, atol=1e-6)
    assert not np.array_equal(result[0][8:16, 8:16], result[1][8:16, 8:16])  # two draws of one image
