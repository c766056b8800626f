"""`tools.crop.edit_on_crop` on every family: the edit runs on the crop of the released pixels, pasted in the input."""

import inspect
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    IF_STAGE1_SIZE, build_pipeline, if_stage1_components, if_stage2_components, kandinsky_decoder_components,
    seeded_generator, test_image
)
from families import FAMILIES as CONTRACT
from families import FLOW

from benchmarks.harness import denoiser
from tools.crop import change_box, edit_on_crop, upscaled_size

PROMPT = "a red apple on a table"
STEPS = 3
SIZE = 64  # test images are 64 x 64 pixels


@dataclass
class Family:
    """What the crop checks need of a family besides its contract entry (tests/families.py)."""

    unit: int  # the model's size unit, in pixels
    scale: int = 2  # pixels per cell of the working grid
    native_grid: int = 32  # the side of the model's native size, in working-grid cells (SD: 64 px, above the crops)
    components: Callable = None  # () -> components, where the contract's are not of the test images' size
    sample_size: int = None  # a flow pipeline's default_sample_size: its native size, as its tests' images
    grid_of: Callable = lambda latents: tuple(latents.shape[-2:])  # the denoiser's input -> its grid's (rows, columns)
    grid_input: str = None  # the denoiser's keyword input that grid_of reads (default: its first input)
    call_arguments: dict = field(default_factory=lambda: dict(prompt=PROMPT))  # besides image, map and generator
    preprocess: Callable = lambda pipe, image: pipe.image_processor.preprocess(image)  # -> [-1, 1] working pixels
    to_input: Callable = lambda crop: crop  # a [0, 1] crop of the working image -> what the edited argument takes
    # IF stage II: (count, box) -> its `image` argument, the stage I results; cut by hand for `box` when given.
    conditioning: Callable = None
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


def control_image(box):
    """A condition unlike the image, whole or as its cut for a crop made by hand (pixels in [0, 1])."""
    condition = test_image(seed=7).transpose(0)
    if box is None:
        return dict(control_image=condition)
    top, left, bottom, right = box
    pixels = torch.from_numpy(np.asarray(condition, np.float32) / 255).permute(2, 0, 1)[None]
    return dict(control_image=pixels[..., top:bottom, left:right])


def packed_grid(image_ids):
    """The latent grid of Flux and Chroma tokens from their (row, column) ids: each token is a 2x2 patch."""
    return tuple(2 * (int(image_ids[:, axis].max()) + 1) for axis in (1, 2))


# IF works in pixels: one working-grid cell is one pixel. The tiny UNets halve the image once: the unit is 8 px,
# the multiple stock IF resizes to. Both stages are built at 64 px, so the 64 px test image is their working grid.
IF_INPUT = dict(unit=8, scale=1, native_grid=64, to_input=lambda crop: crop * 2 - 1,
                call_arguments=dict(prompt=PROMPT, clean_caption=False))  # caption cleaning needs bs4 and ftfy
# The flow families' tiny models share the VAE factor 2, and each rounds sizes to 4 px: 2x2 patches of latents.
# Those that take a default_sample_size get 32 latents a side, 64 px as the tests' images (stock's 128 latents are
# the real models' 1024 px: 256 px at this VAE's factor of 2); SD3's is its transformer's sample_size.
FLOW_INPUT = dict(unit=4, call_arguments=dict(prompt=PROMPT, max_sequence_length=32))

FAMILIES = {
    "sd": Family(unit=2),
    "sdxl": Family(unit=2),
    "sd_controlnet": Family(unit=2, cut_arguments=control_image),
    "sdxl_controlnet": Family(unit=2, cut_arguments=control_image),
    "sd_inpaint": Family(unit=8),
    "sdxl_inpaint": Family(unit=8),
    "kandinsky": Family(
        unit=4,  # pixel_multiple: 2 px per MoVQ latent, and one halving in the UNet
        components=kandinsky_decoder_components,
        # No text: stand-ins for the prior's image embeddings. height=width=None keeps each image's own size, so
        # that a crop run by hand is edited as it is.
        call_arguments=dict(image_embeds=torch.randn(1, 32, generator=seeded_generator(1)),
                            negative_image_embeds=torch.randn(1, 32, generator=seeded_generator(2)),
                            height=None, width=None),
        batched=lambda arguments, count: dict(arguments, **{
            name: arguments[name].repeat(count, 1) for name in ("image_embeds", "negative_image_embeds")}),
    ),
    "if_stage1": Family(components=lambda: if_stage1_components(sample_size=SIZE),
                        preprocess=lambda pipe, image: pipe.preprocess_image(image), **IF_INPUT),
    "if_stage2": Family(components=lambda: if_stage2_components(sample_size=SIZE),
                        preprocess=lambda pipe, image: pipe.preprocess_original_image(image),
                        conditioning=stage1_results, **IF_INPUT),
    "sd3": Family(**FLOW_INPUT),
    "flux": Family(sample_size=32, grid_of=packed_grid, grid_input="img_ids", **FLOW_INPUT),
    "chroma": Family(sample_size=32, grid_of=packed_grid, grid_input="img_ids", **FLOW_INPUT),
    "qwenimage": Family(sample_size=32, grid_of=lambda shapes: (2 * shapes[0][0][1], 2 * shapes[0][0][2]),
                        grid_input="img_shapes", **FLOW_INPUT),
    # Z-Image's transformer takes a list of (C, 1, H, W) latents
    "zimage": Family(sample_size=32, grid_of=lambda latents: tuple(latents[0].shape[-2:]), **FLOW_INPUT),
    # FLUX.2 [klein]'s tiny VAE does not downsample: one latent a pixel, a token 2x2 of them. Its (B, tokens, 4) ids
    # (frame, row, column, layer) hold the source image's reference tokens too, on the same grid.
    "flux2_klein": Family(unit=2, scale=1, sample_size=32, grid_of=lambda ids: packed_grid(ids[0]),
                          grid_input="img_ids",
                          call_arguments=dict(prompt=PROMPT, max_sequence_length=64, text_encoder_out_layers=(1,))),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def pipe(family):
    entry, spec = CONTRACT[family], FAMILIES[family]
    pipe = build_pipeline(entry.ours, (spec.components or entry.components)())
    if spec.sample_size is not None:
        pipe.default_sample_size = spec.sample_size
    return pipe


def outside(top, left, bottom, right):
    """The pixels of the frame outside the box."""
    mask = np.ones((SIZE, SIZE), bool)
    mask[top:bottom, left:right] = False
    return mask


def block_map(*box):
    """Changes the block (strength 1) and keeps the rest of the frame."""
    return outside(*box).astype(np.float32)


def run(pipe, family, image, map, seed=0, box=None, **options):
    """One image, or a batch (a list, or a 4-D tensor) with a prompt and a generator per image. `box`: the crop
    that `image` was cut by hand from the working image."""
    spec = FAMILIES[family]
    arguments = dict(spec.call_arguments, generator=seeded_generator(seed))
    count = len(image) if isinstance(image, list) else len(image) if isinstance(image, torch.Tensor) else 1
    if count > 1:
        arguments = dict(spec.batched(arguments, count), generator=[seeded_generator(seed + k) for k in range(count)])
    if spec.conditioning is not None:
        arguments["image"] = spec.conditioning(count, box)
    if spec.cut_arguments is not None:
        arguments.update(spec.cut_arguments(box))
    arguments[CONTRACT[family].edited] = image
    output = pipe(**{**arguments, **options}, map=map, num_inference_steps=STEPS)
    return output.images if hasattr(output, "images") else output


def cropped(pipe, family, image, map, margin=0, upscale=False, seed=0, **options):
    """`run` through the crop: (images, box)."""
    return run(lambda **call: edit_on_crop(pipe, margin, upscale, **call), family, image, map, seed, **options)


@contextmanager
def denoiser_grids(pipe, family):
    """The working-grid size of every denoiser call within the block."""
    spec, grids = FAMILIES[family], []

    def record(module, args, kwargs):
        grids.append(spec.grid_of(kwargs[spec.grid_input] if spec.grid_input else (args or list(kwargs.values()))[0]))

    hook = denoiser(pipe).register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield grids
    finally:
        hook.remove()


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


def assert_pasted_into(outputs, sources, box):
    """Outside `box`, each output (np, in [0, 1]) is its source image."""
    for output, source in zip(outputs, sources, strict=True):
        np.testing.assert_allclose(output[outside(*box)], np.asarray(source)[outside(*box)] / 255, atol=1e-6)


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


@pytest.mark.parametrize("crop, native, size", [
    ((64, 64), 512, (512, 512)),  # the aspect ratio kept at the native area
    ((32, 128), 512, (256, 1024)),
    ((1024, 1024), 512, (1024, 1024)),  # never shrunk
    # A side that reaches the grid's edge keeps the grid's length, which need not be a whole unit.
    ((30, 50), 512, (400, 664)),
    ((97, 97), 98, (104, 104)),  # 98 px rounds to 96, smaller than the crop: the next unit up
    ((1001, 1003), 512, (1001, 1003)),  # at least native already: edited as it is
])
def test_the_upscaled_size_keeps_the_aspect_ratio_at_the_native_area_in_units_and_never_shrinks(crop, native, size):
    assert upscaled_size(*crop, native, 8) == size


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
    with denoiser_grids(pipe, family) as grids:
        results, box = cropped(pipe, family, image, keep_map, margin)
    assert box == (top, left, bottom, right) and results[0].size == image.size
    crop_grid = ((bottom - top) // spec.scale, (right - left) // spec.scale)
    assert grids and set(grids) == {crop_grid} and len(grids) % STEPS == 0
    result, kept = np.asarray(results[0]), outside(*box)
    np.testing.assert_array_equal(result[kept], np.asarray(image)[kept])
    assert not np.array_equal(result[~kept], np.asarray(image)[~kept])

    working = spec.working_image(pipe, image)
    inside = cropped(pipe, family, image, keep_map, margin, output_type="np")[0][0]
    expected = by_hand(pipe, family, working, keep_map, box)[0]
    np.testing.assert_array_equal(inside[top:bottom, left:right], expected)


@pytest.mark.parametrize("images_per_prompt", [1, 2])
def test_a_batch_is_edited_on_the_union_of_its_changes(pipe, family, images_per_prompt):
    spec = FAMILIES[family]
    images = [test_image(seed=1), test_image(seed=2)]
    keep_maps = np.stack([block_map(8, 8, 16, 16), block_map(40, 24, 48, 32)])
    box = (8, 8, 48, 32)  # margin 0, and both blocks lie on whole units

    def options():  # several images per prompt: a, b, a, b (the batch repeated whole), or a, a, b, b
        if images_per_prompt == 1:
            return {}
        per_output = "a generator per image" not in CONTRACT[family].skip  # SD3 takes one generator per image
        return dict(num_images_per_prompt=2, generator=[seeded_generator(k) for k in range(4)] if per_output
                    else seeded_generator())

    with denoiser_grids(pipe, family) as grids:
        batched, crop_box = cropped(pipe, family, images, keep_maps, output_type="np", **options())
    assert crop_box == box and set(grids) == {(40 // spec.scale, 24 // spec.scale)}
    working = torch.cat([spec.working_image(pipe, image) for image in images])
    expected = by_hand(pipe, family, working, keep_maps, box, **options())
    assert len(batched) == len(expected) == 2 * images_per_prompt
    np.testing.assert_array_equal(batched[:, 8:48, 8:32], expected)
    adjacent = CONTRACT[family].repeats == "each"
    sources = [images[item // images_per_prompt if adjacent else item % 2] for item in range(len(batched))]
    assert_pasted_into(batched, sources, box)


def test_copies_of_one_image_are_each_pasted_into_it(pipe, family):
    image, keep_map = test_image(), block_map(8, 8, 24, 24)
    copies, _ = cropped(pipe, family, image, keep_map, num_images_per_prompt=2, output_type="np")
    assert len(copies) == 2 and not np.array_equal(copies[0], copies[1])  # two draws of the noise
    assert_pasted_into(copies, [image, image], (8, 8, 24, 24))


def test_the_crop_holds_every_pixel_the_family_releases(pipe, family):
    # Strength 0.4 / T in one corner: flow-matching img2img runs ceil(0.4) = 1 step there, SD and the others none.
    spec = FAMILIES[family]
    keep_map = block_map(0, 0, 16, 16)
    keep_map[48:64, 48:64] = 1 - 0.4 / STEPS
    with denoiser_grids(pipe, family) as grids:
        cropped(pipe, family, test_image(), keep_map, output_type="np")
    side = SIZE if CONTRACT[family].rule == FLOW else max(16, spec.unit)
    assert set(grids) == {(side // spec.scale, side // spec.scale)}


def test_a_map_that_releases_nothing_returns_the_input_without_a_step(pipe, family):
    image = test_image()
    with denoiser_grids(pipe, family) as grids:
        results, box = cropped(pipe, family, image, np.ones((SIZE, SIZE), np.float32), margin=32)
    assert grids == [] and box is None and pipe.num_timesteps == 0
    np.testing.assert_array_equal(np.asarray(results[0]), np.asarray(image))


def test_crop_upscale_edits_the_crop_at_the_native_size_and_keeps_the_rest_exact(pipe, family):
    spec = FAMILIES[family]
    image, keep_map = test_image(), block_map(24, 24, 40, 40)
    keep_map[28:36, 28:36] = 0.5  # a softer centre, to check that its map is carried along
    with denoiser_grids(pipe, family) as grids:
        result = np.asarray(cropped(pipe, family, image, keep_map, upscale=True, keep_exact=True)[0][0])
    assert set(grids) == {(spec.native_grid, spec.native_grid)}
    kept = outside(24, 24, 40, 40)
    np.testing.assert_array_equal(result[kept], np.asarray(image)[kept])
    assert not np.array_equal(result[~kept], np.asarray(image)[~kept])


@pytest.mark.parametrize("family", ["sd"], indirect=True)
def test_keep_exact_on_a_crop_at_its_own_size_keeps_the_input_bytes_inside_the_crop_too(pipe, family):
    # The crop's margin holds kept pixels that the model saw: keep_exact must reach the crop call for them.
    image, keep_map = test_image(), block_map(24, 24, 40, 40)
    result = np.asarray(cropped(pipe, family, image, keep_map, margin=8, keep_exact=True)[0][0])
    kept = keep_map == 1
    np.testing.assert_array_equal(result[kept], np.asarray(image)[kept])
    plain = np.asarray(cropped(pipe, family, image, keep_map, margin=8)[0][0])
    margin = kept & ~outside(16, 16, 48, 48)
    assert not np.array_equal(plain[margin], np.asarray(image)[margin])  # without it, the VAE's round trip shows
    np.testing.assert_array_equal(result[~kept], plain[~kept])


@pytest.mark.parametrize("options, message", [
    (dict(output_type="latent"), 'pass an `output_type` of "pil", "np" or "pt", not \'latent\''),
    *[(dict(margin=margin), f"`margin` must be a whole number of pixels, 0 or more, not {margin}")
      for margin in (-1, 2.5, True)],
])
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


@pytest.mark.parametrize("options, named", [
    (dict(denoising_end=0.8, output_type="latent"), "`denoising_end`"),
    (dict(denoising_start=0.8), "`denoising_start`"),
    (dict(latents=torch.zeros(1, 4, 32, 32)), "`latents`"),
    (dict(noise=torch.zeros(1, 4, 32, 32)), "`noise`"),
])
@pytest.mark.parametrize("family", ["sdxl"], indirect=True)
def test_sdxl_refuses_to_crop_one_stage_of_base_and_refiner(pipe, family, options, named):
    image = torch.zeros(1, 4, 32, 32) if "denoising_start" in options else test_image()
    with pytest.raises(ValueError, match=f"The crop runs the whole schedule .* takes no {named}: .* as `edit`"):
        cropped(pipe, family, image, block_map(0, 0, 8, 8), **options)


@pytest.mark.parametrize("family", ["sdxl"], indirect=True)
def test_sdxl_conditions_the_crop_on_its_own_size(pipe, family):
    time_ids = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: time_ids.append(kwargs["added_cond_kwargs"]["time_ids"]), with_kwargs=True)
    try:
        cropped(pipe, family, test_image(), block_map(4, 40, 20, 60))
    finally:
        hook.remove()
    # (original size, crop coordinates, target size) of a 16 x 20 image given alone, as by hand; twice for guidance
    assert all(ids.tolist() == [[16, 20, 0, 0, 16, 20]] * 2 for ids in time_ids) and len(time_ids) == STEPS


@pytest.mark.parametrize("family", ["kandinsky"], indirect=True)
def test_kandinsky_pastes_each_output_of_one_map_into_its_own_image_in_stock_order(pipe, family):
    images = [test_image(seed=1), test_image(seed=2)]
    # Stock orders outputs a, a, b, b for two images and num_images_per_prompt=2; one map serves both images.
    result, _ = cropped(pipe, family, images, block_map(8, 8, 16, 16), num_images_per_prompt=2, output_type="np",
                        generator=[seeded_generator(k) for k in range(4)])
    assert_pasted_into(result, [images[0], images[0], images[1], images[1]], (8, 8, 16, 16))
    assert not np.array_equal(result[0][8:16, 8:16], result[1][8:16, 8:16])  # two draws of one image
