"""IFDiffImg2ImgPipeline (stage I) and IFDiffImg2ImgSuperResolutionPipeline (stage II) against stock diffusers.

Tiny random IF models: stage I works at 32 px, stage II at 64 px. IF denoises pixels, so the map acts on each
stage's own pixel grid, and x0 is the preprocessed image itself: the tests recompute it from the PIL image.
"""

import copy
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    IF_STAGE1_SIZE,
    IF_STAGE2_SIZE,
    build_pipeline,
    if_stage1_components,
    if_stage2_components,
    make_scheduler,
    seeded_generator,
    test_image,
)
from diffusers import DiffusionPipeline, IFImg2ImgPipeline, IFImg2ImgSuperResolutionPipeline
from diffusers.utils.dynamic_modules_utils import find_pipeline_class
from PIL import Image

from IF.diff_pipe_I import IFDiffImg2ImgPipeline
from IF.diff_pipe_II import IFDiffImg2ImgSuperResolutionPipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red apple on a table"
MAP_SIZE = 64
NO_CLEANING = dict(clean_caption=False)  # caption cleaning needs bs4 and ftfy, which the tests do not need


# Batched and single runs add the same float32 products in other orders (other kernel shapes). Sums of ~1e3 terms
# then differ by up to ~1e3 * 2**-24, about 1e-4 of their magnitude, which is also far below what a map applied to
# the wrong item would change.
BATCH_RTOL = 1e-4


def assert_close_to_single_run(batched, alone):
    batched, alone = np.asarray(batched), np.asarray(alone)
    np.testing.assert_allclose(batched, alone, rtol=BATCH_RTOL, atol=BATCH_RTOL * np.abs(alone).max())


@pytest.fixture(scope="module")
def stage1_components():
    return if_stage1_components()


@pytest.fixture(scope="module")
def stage2_components():
    return if_stage2_components()


def stage1_pipelines(components, scheduler=None):
    if scheduler is not None:  # a fresh scheduler for each pair, built from IF's own config
        components = {**components, "scheduler": make_scheduler(scheduler, components["scheduler"].config)}
    return build_pipeline(IFImg2ImgPipeline, components), build_pipeline(IFDiffImg2ImgPipeline, components)


def stage2_pipelines(components):
    return (build_pipeline(IFImg2ImgSuperResolutionPipeline, components),
            build_pipeline(IFDiffImg2ImgSuperResolutionPipeline, components))


def stage2_inputs(seed=0):
    """What stage II takes: the stage I result (32 px) and the original being edited (64 px)."""
    return dict(image=test_image(IF_STAGE1_SIZE, seed=seed + 10), original_image=test_image(IF_STAGE2_SIZE, seed=seed))


def three_band_map(size=MAP_SIZE):
    """Left third kept, middle third at strength 0.5, right third changed fully."""
    keep_map = np.ones((size, size), np.float32)
    keep_map[:, size // 3 : 2 * size // 3] = 0.5
    keep_map[:, 2 * size // 3 :] = 0.0
    return keep_map


def band_columns(grid):
    """Columns of a `grid`-wide pixel grid lying well inside each band of `three_band_map`."""
    third = grid // 3
    return slice(0, third - 1), slice(third + 2, 2 * third - 1), slice(2 * third + 2, None)


def x0_of(image, size):
    """The pixels IF starts from, recomputed here: bicubic resize to the stage's size, then [-1, 1]."""
    resized = image.resize((size, size), resample=Image.Resampling.BICUBIC, reducing_gap=None)
    return torch.from_numpy(np.asarray(resized, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def unet_inputs(pipe):
    """Records the noisy images the UNet is called on, before each step."""
    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, :3].clone()))
    return seen


# ---------------------------------------------------------------------------------------------------------------
# Stock equivalence


@pytest.mark.parametrize("scheduler", [None, "dpm++"], ids=["ddpm", "dpm++"])
@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0])
def test_stage1_uniform_map_is_stock_img2img(stage1_components, scheduler, strength):
    stock, ours = stage1_pipelines(stage1_components, scheduler)
    run = dict(image=test_image(), num_inference_steps=8, output_type="pt", **NO_CLEANING)
    expected = stock(PROMPT, strength=strength, generator=seeded_generator(), **run).images
    # A black map at global strength s, and a gray map 1 - s at strength 1: both are s everywhere.
    for keep, global_strength in [(0.0, strength), (1 - strength, 1.0)]:
        ours.scheduler = copy.deepcopy(stock.scheduler)
        keep_map = np.full((MAP_SIZE, MAP_SIZE), keep, np.float32)
        result = ours(PROMPT, map=keep_map, strength=global_strength, generator=seeded_generator(), **run).images
        assert torch.equal(result, expected)
        assert ours.num_timesteps == int(8 * strength)


@pytest.mark.parametrize("strength, guidance_scale", [(0.5, 1.0), (1.0, 4.0)])
def test_stage2_uniform_map_is_stock_super_resolution(stage2_components, strength, guidance_scale):
    stock, ours = stage2_pipelines(stage2_components)
    run = dict(**stage2_inputs(), prompt=PROMPT, num_inference_steps=6, guidance_scale=guidance_scale,
               output_type="pt", **NO_CLEANING)
    expected = stock(strength=strength, generator=seeded_generator(), **run).images
    keep_map = np.full((MAP_SIZE, MAP_SIZE), 1 - strength, np.float32)
    result = ours(map=keep_map, generator=seeded_generator(), **run).images
    assert result.shape == (1, 3, IF_STAGE2_SIZE, IF_STAGE2_SIZE)
    assert torch.equal(result, expected)
    assert ours.num_timesteps == int(6 * strength)


# ---------------------------------------------------------------------------------------------------------------
# Frozen and kept pixels, in pixel space


def noised_original(scheduler, x0, noise, t):
    """DDPM's forward process q(x_t | x0), written out: IF's learned variance plays no part in it."""
    alpha_bar = scheduler.alphas_cumprod[t]
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


def assert_frozen_then_released(unet_seen, scheduler, x0, noise, grid, steps):
    """Before step k the UNet sees the noised original at t_k at every pixel still frozen, and not elsewhere."""
    kept, half, changed = band_columns(grid)
    assert len(unet_seen) == steps  # the changed band releases at step 0, so every step runs
    for k, images in enumerate(unet_seen):
        noised = noised_original(scheduler, x0, noise, scheduler.timesteps[k])
        assert torch.equal(images[..., kept], noised[..., kept])
        if k <= steps // 2:  # strength 0.5 releases at step T/2, which already runs on the noised original
            assert torch.equal(images[..., half], noised[..., half])
        else:
            assert not torch.allclose(images[..., half], noised[..., half], atol=1e-3)
        if k > 0:
            assert not torch.allclose(images[..., changed], noised[..., changed], atol=1e-3)


def test_stage1_frozen_pixels_follow_the_noised_original_and_kept_pixels_end_as_x0(stage1_components):
    _, ours = stage1_pipelines(stage1_components)
    image, steps = test_image(), 10
    x0 = x0_of(image, IF_STAGE1_SIZE)
    noise = torch.randn(x0.shape, generator=seeded_generator())  # the first draw, as in stock
    reference = copy.deepcopy(ours.scheduler)
    reference.set_timesteps(steps)
    seen = unet_inputs(ours)

    final = ours(PROMPT, image=image, map=three_band_map(), num_inference_steps=steps, guidance_scale=1.0,
                 generator=seeded_generator(), output_type="pt", **NO_CLEANING).images

    assert_frozen_then_released(seen, reference, x0, noise, IF_STAGE1_SIZE, steps)
    kept, _, changed = band_columns(IF_STAGE1_SIZE)
    assert torch.equal(final[..., kept], x0[..., kept])
    assert not torch.allclose(final[..., changed], x0[..., changed], atol=1e-2)


def test_stage2_frozen_pixels_follow_the_noised_original_and_kept_pixels_end_as_x0(stage2_components):
    _, ours = stage2_pipelines(stage2_components)
    inputs, steps = stage2_inputs(), 6
    x0 = x0_of(inputs["original_image"], IF_STAGE2_SIZE)
    noise = torch.randn(x0.shape, generator=seeded_generator())  # drawn before the conditioning's noise
    reference = copy.deepcopy(ours.scheduler)
    reference.set_timesteps(steps)
    seen = unet_inputs(ours)

    final = ours(**inputs, map=three_band_map(), prompt=PROMPT, num_inference_steps=steps, guidance_scale=1.0,
                 generator=seeded_generator(), output_type="pt", **NO_CLEANING).images

    assert_frozen_then_released(seen, reference, x0, noise, IF_STAGE2_SIZE, steps)
    kept, _, changed = band_columns(IF_STAGE2_SIZE)
    assert torch.equal(final[..., kept], x0[..., kept])
    assert not torch.allclose(final[..., changed], x0[..., changed], atol=1e-2)


def test_the_map_works_on_each_stages_own_grid(stage1_components, stage2_components):
    """The same 64 px map keeps the same image region at 32 px (stage I) and at 64 px (stage II)."""
    keep_map = np.zeros((MAP_SIZE, MAP_SIZE), np.float32)
    keep_map[:32] = 1.0  # the top half is kept
    _, stage1 = stage1_pipelines(stage1_components)
    _, stage2 = stage2_pipelines(stage2_components)
    first = stage1(PROMPT, image=test_image(), map=keep_map, num_inference_steps=4, guidance_scale=1.0,
                   generator=seeded_generator(), output_type="pt", **NO_CLEANING).images
    assert torch.equal(first[..., :16, :], x0_of(test_image(), IF_STAGE1_SIZE)[..., :16, :])
    assert not torch.allclose(first[..., 16:, :], x0_of(test_image(), IF_STAGE1_SIZE)[..., 16:, :], atol=1e-2)
    original = test_image()
    second = stage2(image=first, original_image=original, map=keep_map, prompt=PROMPT, num_inference_steps=4,
                    guidance_scale=1.0, generator=seeded_generator(), output_type="pt", **NO_CLEANING).images
    assert torch.equal(second[..., :32, :], x0_of(original, IF_STAGE2_SIZE)[..., :32, :])
    assert not torch.allclose(second[..., 32:, :], x0_of(original, IF_STAGE2_SIZE)[..., 32:, :], atol=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# Skipped steps and the map that changes nothing


@pytest.mark.parametrize("max_strength, unet_calls", [(0.5, 10), (0.3, 6), (0.05, 1)])
def test_steps_before_the_first_release_never_run(stage1_components, max_strength, unet_calls):
    _, ours = stage1_pipelines(stage1_components)
    seen = unet_inputs(ours)
    keep_map = np.ones((MAP_SIZE, MAP_SIZE), np.float32)
    keep_map[:, 32:] = 1 - max_strength
    ours(PROMPT, image=test_image(), map=keep_map, num_inference_steps=20, guidance_scale=1.0,
         generator=seeded_generator(), output_type="pt", **NO_CLEANING)
    assert len(seen) == unet_calls == ours.num_timesteps


def test_stage1_white_map_runs_no_step_and_returns_the_original(stage1_components):
    _, ours = stage1_pipelines(stage1_components)
    seen = unet_inputs(ours)
    image = test_image()
    x0 = x0_of(image, IF_STAGE1_SIZE)
    for keep_map, strength in [(np.ones((MAP_SIZE, MAP_SIZE), np.float32), 1.0), (three_band_map(), 0.0)]:
        result = ours(PROMPT, image=image, map=keep_map, strength=strength, num_inference_steps=10,
                      generator=seeded_generator(), output_type="pt", **NO_CLEANING).images
        assert torch.equal(result, x0)
        assert ours.num_timesteps == 0
    pixels = ours(PROMPT, image=image, map=np.ones((MAP_SIZE, MAP_SIZE)), num_images_per_prompt=2,
                  output_type="np", **NO_CLEANING).images
    expected = (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert pixels.shape == (2, IF_STAGE1_SIZE, IF_STAGE1_SIZE, 3) and np.array_equal(pixels, expected.repeat(2, 0))
    assert seen == []


def test_stage2_white_map_runs_no_step_and_returns_the_original(stage2_components):
    _, ours = stage2_pipelines(stage2_components)
    seen = unet_inputs(ours)
    inputs = stage2_inputs()
    result = ours(**inputs, map=np.ones((MAP_SIZE, MAP_SIZE), np.float32), prompt=PROMPT, output_type="pil",
                  **NO_CLEANING).images
    assert seen == [] and ours.num_timesteps == 0
    assert np.array_equal(np.asarray(result[0]), np.asarray(inputs["original_image"]))


def test_stage1_keep_exact_gives_the_inputs_bytes_and_changes_nothing_else(stage1_components):
    """IF has no VAE round trip: kept pixels already end as the original at the stage's size."""
    _, ours = stage1_pipelines(stage1_components)
    image = test_image(IF_STAGE1_SIZE)  # at stage I's size, so that x0 holds the input's own bytes
    run = dict(image=[image, test_image(IF_STAGE1_SIZE, seed=1)], map=[three_band_map(), 1 - three_band_map()],
               num_images_per_prompt=2, num_inference_steps=8, guidance_scale=1.0, output_type="np", **NO_CLEANING)
    plain = ours([PROMPT, PROMPT], generator=[seeded_generator(s) for s in range(4)], **run).images
    exact = ours([PROMPT, PROMPT], generator=[seeded_generator(s) for s in range(4)], keep_exact=True, **run).images
    assert np.array_equal(exact, plain)
    kept, _, _ = band_columns(IF_STAGE1_SIZE)
    pil = ours(PROMPT, image=image, map=three_band_map(), keep_exact=True, num_inference_steps=8,
               generator=seeded_generator(), **NO_CLEANING).images[0]
    assert np.array_equal(np.asarray(pil)[:, kept], np.asarray(image)[:, kept])


def test_stage2_keep_exact_changes_nothing_in_pixel_space(stage2_components):
    _, ours = stage2_pipelines(stage2_components)
    run = dict(**stage2_inputs(), map=three_band_map(), prompt=PROMPT, num_inference_steps=4, guidance_scale=1.0,
               output_type="pil", **NO_CLEANING)
    plain = ours(generator=seeded_generator(), **run).images[0]
    exact = ours(generator=seeded_generator(), keep_exact=True, **run).images[0]
    assert np.array_equal(np.asarray(exact), np.asarray(plain))
    kept, _, _ = band_columns(IF_STAGE2_SIZE)
    assert np.array_equal(np.asarray(exact)[:, kept], np.asarray(run["original_image"])[:, kept])


def test_prepare_intermediate_images_works_outside_a_differential_call(stage1_components):
    stock, ours = stage1_pipelines(stage1_components)
    pixels, timestep = x0_of(test_image(), IF_STAGE1_SIZE), torch.tensor([500])
    args = (pixels, timestep, 1, 1, torch.float32, torch.device("cpu"))
    expected = stock.prepare_intermediate_images(*args, seeded_generator())
    assert torch.equal(ours.prepare_intermediate_images(*args, seeded_generator()), expected)


# ---------------------------------------------------------------------------------------------------------------
# Batches


def test_stage1_images_and_copies_each_equal_their_own_run(stage1_components):
    """Two images with their own maps, two copies of each: IF orders them image by image, and so do the maps."""
    _, ours = stage1_pipelines(stage1_components)
    images, maps = [test_image(seed=1), test_image(seed=2)], [three_band_map(), 1 - three_band_map()]
    prompts, seeds = ["a red apple", "a blue pear"], [[3, 4], [5, 6]]
    # Without guidance: a batched UNet rounds differently in the last bits, and a guidance of 10 magnifies that to
    # 1e-3 in stock IF too; a map applied to the wrong copy would differ by far more.
    run = dict(num_inference_steps=6, guidance_scale=1.0, output_type="pt", **NO_CLEANING)
    batch = ours(prompts, image=images, map=maps, num_images_per_prompt=2,
                 generator=[seeded_generator(s) for pair in seeds for s in pair], **run).images
    assert batch.shape == (4, 3, IF_STAGE1_SIZE, IF_STAGE1_SIZE)
    for i in range(2):
        for j in range(2):
            alone = ours(prompts[i], image=images[i], map=maps[i], generator=seeded_generator(seeds[i][j]),
                         **run).images[0]
            assert_close_to_single_run(batch[2 * i + j], alone)


def test_one_map_is_shared_by_a_batch(stage1_components):
    _, ours = stage1_pipelines(stage1_components)
    images, prompts = [test_image(seed=1), test_image(seed=2)], ["a red apple", "a blue pear"]
    generators = lambda: [seeded_generator(5), seeded_generator(6)]  # noqa: E731
    run = dict(image=images, num_inference_steps=6, output_type="pt", **NO_CLEANING)
    shared = ours(prompts, map=three_band_map(), generator=generators(), **run).images
    repeated = ours(prompts, map=[three_band_map()] * 2, generator=generators(), **run).images
    assert torch.equal(shared, repeated)


def test_stage2_images_and_copies_each_equal_their_own_run(stage2_components):
    _, ours = stage2_pipelines(stage2_components)
    inputs = [stage2_inputs(seed=1), stage2_inputs(seed=2)]
    maps, prompts, seeds = [three_band_map(), 1 - three_band_map()], ["a red apple", "a blue pear"], [[3, 4], [5, 6]]
    run = dict(num_inference_steps=3, guidance_scale=1.0, output_type="pt", **NO_CLEANING)
    batch = ours(image=[i["image"] for i in inputs], original_image=[i["original_image"] for i in inputs], map=maps,
                 prompt=prompts, num_images_per_prompt=2,
                 generator=[seeded_generator(s) for pair in seeds for s in pair],
                 **run).images
    assert batch.shape == (4, 3, IF_STAGE2_SIZE, IF_STAGE2_SIZE)
    for i in range(2):
        for j in range(2):
            alone = ours(**inputs[i], map=maps[i], prompt=prompts[i], generator=seeded_generator(seeds[i][j]),
                         **run).images[0]
            assert_close_to_single_run(batch[2 * i + j], alone)


# ---------------------------------------------------------------------------------------------------------------
# IF's step callback


def test_user_callback_follows_the_blend_every_callback_steps(stage1_components):
    _, ours = stage1_pipelines(stage1_components)
    image, steps = test_image(), 10
    x0 = x0_of(image, IF_STAGE1_SIZE)
    calls = []

    def record_then_zero_at_the_end(i, t, intermediate_images):
        calls.append((i, intermediate_images.clone()))
        if i == steps - 1:
            intermediate_images.zero_()  # IF's callback can only act in place; the result must show it

    result = ours(PROMPT, image=image, map=three_band_map(), num_inference_steps=steps, guidance_scale=1.0,
                  generator=seeded_generator(), output_type="pt", callback=record_then_zero_at_the_end,
                  callback_steps=3, **NO_CLEANING).images
    assert [i for i, _ in calls] == [0, 3, 6, 9]
    kept, _, _ = band_columns(IF_STAGE1_SIZE)
    assert torch.equal(calls[-1][1][..., kept], x0[..., kept])  # the last call sees the kept pixels reset to x0
    assert torch.equal(result, torch.zeros_like(result))


def test_stage2_passes_callback_and_its_steps_on(stage2_components):
    _, ours = stage2_pipelines(stage2_components)
    calls = []
    ours(**stage2_inputs(), map=three_band_map(), prompt=PROMPT, num_inference_steps=4, guidance_scale=1.0,
         output_type="pt", callback=lambda i, t, images: calls.append(i), callback_steps=2, **NO_CLEANING)
    assert calls == [0, 2]


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_alias_is_the_class_but_not_a_second_module_member():
    module = importlib.import_module("IF.diff_pipe_I")
    from IF.diff_pipe_I import DiffIFImg2ImgPipeline

    assert DiffIFImg2ImgPipeline is IFDiffImg2ImgPipeline
    assert "DiffIFImg2ImgPipeline" not in dir(module)
    assert find_pipeline_class(module) is IFDiffImg2ImgPipeline
    with pytest.raises(AttributeError, match="NoSuchPipeline"):
        module.NoSuchPipeline  # noqa: B018


def run_stage1(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, image=test_image(), map=three_band_map(), num_inference_steps=4, generator=seeded_generator(),
                output_type="pt", **NO_CLEANING).images


def test_stage1_loads_as_class_as_custom_pipeline_and_from_pipe(if_stage1_dir):
    by_class = IFDiffImg2ImgPipeline.from_pretrained(if_stage1_dir)
    by_custom = DiffusionPipeline.from_pretrained(if_stage1_dir, custom_pipeline=str(REPO_ROOT / "IF/diff_pipe_I.py"),
                                                  trust_remote_code=True)
    assert type(by_custom).__name__ == "IFDiffImg2ImgPipeline"
    from_pipe = IFDiffImg2ImgPipeline.from_pipe(IFImg2ImgPipeline.from_pretrained(if_stage1_dir))
    results = [run_stage1(pipe) for pipe in (by_class, by_custom, from_pipe)]
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_stage2_loads_as_class_and_as_custom_pipeline_without_naming_the_watermarker(if_stage2_dir):
    # Stock IFImg2ImgSuperResolutionPipeline would need watermarker=None to load this folder.
    by_class = IFDiffImg2ImgSuperResolutionPipeline.from_pretrained(if_stage2_dir, text_encoder=None)
    by_custom = DiffusionPipeline.from_pretrained(
        if_stage2_dir, custom_pipeline=str(REPO_ROOT / "IF/diff_pipe_II.py"), trust_remote_code=True
    )
    assert type(by_custom).__name__ == "IFDiffImg2ImgSuperResolutionPipeline"
    assert by_class.text_encoder is None and by_class.watermarker is None
    from_pipe = IFDiffImg2ImgSuperResolutionPipeline.from_pipe(
        IFImg2ImgSuperResolutionPipeline.from_pretrained(if_stage2_dir, watermarker=None)
    )
    embeds, negative = by_custom.encode_prompt(PROMPT, **NO_CLEANING)
    results = []
    for pipe in (by_class, by_custom, from_pipe):
        pipe.set_progress_bar_config(disable=True)
        results.append(pipe(**stage2_inputs(), map=three_band_map(), prompt_embeds=embeds,
                            negative_prompt_embeds=negative, num_inference_steps=2, generator=seeded_generator(),
                            output_type="pt").images)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(map=[np.zeros((64, 64))] * 3), "3 maps for 1 images"),
        (dict(map=np.zeros((64, 32))), "aspect ratio"),
        (dict(map=None), "`map`"),
        (dict(map=np.full((64, 64), 2.0)), r"\[0, 1\]"),
        (dict(strength=1.5), "strength"),
        (dict(strength=-0.1), "strength"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(callback_steps=0), "callback_steps"),
    ],
)
def test_stage1_bad_arguments_are_refused_clearly(stage1_components, change, message):
    _, ours = stage1_pipelines(stage1_components)
    run = {**dict(image=test_image(), map=np.zeros((64, 64), np.float32), num_inference_steps=4), **change}
    with pytest.raises(ValueError, match=message):
        ours(PROMPT, **run, **NO_CLEANING)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(original_image=None), "original_image"),
        (dict(image=None), "stage I result"),
        (dict(map=[np.zeros((64, 64))] * 2), "2 maps for 1 images"),
        (dict(strength=2), "strength"),
        (dict(prompt=None), "prompt"),
    ],
)
def test_stage2_bad_arguments_are_refused_clearly(stage2_components, change, message):
    _, ours = stage2_pipelines(stage2_components)
    run = {**stage2_inputs(), "map": np.zeros((64, 64), np.float32), "prompt": PROMPT, "num_inference_steps": 2,
           **change}
    with pytest.raises(ValueError, match=message):
        ours(**run, **NO_CLEANING)

