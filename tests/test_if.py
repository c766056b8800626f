"""What is particular to IF's two stages (stage I at 32 px, stage II at 64 px): each stage's own pixel grid, keep_exact
without a VAE, IF's older step callback, the authors' class name, loading stage II without its watermarker."""

import importlib

import numpy as np
import pytest
import torch
from conftest import (
    IF_STAGE1_SIZE, IF_STAGE2_SIZE, build_pipeline, if_stage1_components, if_stage2_components, seeded_generator,
    test_image,
)
from diffusers import IFImg2ImgPipeline, IFImg2ImgSuperResolutionPipeline
from families import band_map, if_pixels

from IF.diff_pipe_I import IFDiffImg2ImgPipeline
from IF.diff_pipe_II import IFDiffImg2ImgSuperResolutionPipeline

PROMPT = "a red apple on a table"
NO_CLEANING = dict(clean_caption=False)  # caption cleaning needs bs4 and ftfy, which the tests do not need
THREE_BANDS = band_map(1.0, 0.5, 0.0)  # kept, strength 0.5, changed fully
# Columns lying well inside the kept band of THREE_BANDS, on stage I's and on stage II's grid.
KEPT1, KEPT2 = slice(0, IF_STAGE1_SIZE // 3 - 1), slice(0, IF_STAGE2_SIZE // 3 - 1)


@pytest.fixture(scope="module")
def stage1():
    return build_pipeline(IFDiffImg2ImgPipeline, if_stage1_components())


@pytest.fixture(scope="module")
def stage2():
    return build_pipeline(IFDiffImg2ImgSuperResolutionPipeline, if_stage2_components())


def stage2_inputs(seed=0):
    """What stage II takes: the stage I result (32 px) and the original being edited (64 px)."""
    return dict(image=test_image(IF_STAGE1_SIZE, seed=seed + 10), original_image=test_image(IF_STAGE2_SIZE, seed=seed))


def test_the_map_works_on_each_stages_own_grid(stage1, stage2):
    """The same 64 px map keeps the same image region at 32 px (stage I) and at 64 px (stage II)."""
    keep_map = np.zeros((64, 64), np.float32)
    keep_map[:32] = 1.0  # the top half is kept
    run = dict(map=keep_map, prompt=PROMPT, num_inference_steps=4, guidance_scale=1.0, output_type="pt", **NO_CLEANING)
    first = stage1(image=test_image(), generator=seeded_generator(), **run).images  # 64 px, resized to 32
    x0 = if_pixels(test_image(), IF_STAGE1_SIZE)
    assert torch.equal(first[..., :16, :], x0[..., :16, :])
    assert not torch.allclose(first[..., 16:, :], x0[..., 16:, :], atol=1e-2)
    second = stage2(image=first, original_image=test_image(), generator=seeded_generator(), **run).images
    x0 = if_pixels(test_image(), IF_STAGE2_SIZE)
    assert torch.equal(second[..., :32, :], x0[..., :32, :])
    assert not torch.allclose(second[..., 32:, :], x0[..., 32:, :], atol=1e-2)


# keep_exact without a VAE round trip


def test_stage1_keep_exact_gives_the_inputs_bytes_and_changes_nothing_else(stage1):
    """IF has no VAE round trip: kept pixels already end as the original at the stage's size."""
    image = test_image(IF_STAGE1_SIZE)  # at stage I's size, so that x0 holds the input's own bytes
    run = dict(image=[image, test_image(IF_STAGE1_SIZE, seed=1)], map=[THREE_BANDS, 1 - THREE_BANDS],
               num_images_per_prompt=2, num_inference_steps=8, guidance_scale=1.0, output_type="np", **NO_CLEANING)
    plain = stage1([PROMPT, PROMPT], generator=[seeded_generator(s) for s in range(4)], **run).images
    exact = stage1([PROMPT, PROMPT], generator=[seeded_generator(s) for s in range(4)], keep_exact=True, **run).images
    assert np.array_equal(exact, plain)
    pil = stage1(PROMPT, image=image, map=THREE_BANDS, keep_exact=True, num_inference_steps=8,
                 generator=seeded_generator(), **NO_CLEANING).images[0]
    assert np.array_equal(np.asarray(pil)[:, KEPT1], np.asarray(image)[:, KEPT1])


def test_stage2_keep_exact_changes_nothing_in_pixel_space(stage2):
    run = dict(**stage2_inputs(), map=THREE_BANDS, prompt=PROMPT, num_inference_steps=4, guidance_scale=1.0,
               output_type="pil", **NO_CLEANING)
    plain = stage2(generator=seeded_generator(), **run).images[0]
    exact = stage2(generator=seeded_generator(), keep_exact=True, **run).images[0]
    assert np.array_equal(np.asarray(exact), np.asarray(plain))
    assert np.array_equal(np.asarray(exact)[:, KEPT2], np.asarray(run["original_image"])[:, KEPT2])
    # Without keep_exact too, a white map gives the original's own bytes: x0 is the original, at the stage's size.
    white = stage2(**{**run, "map": np.ones((64, 64), np.float32)}).images[0]
    assert np.array_equal(np.asarray(white), np.asarray(run["original_image"]))


def test_prepare_intermediate_images_works_outside_a_differential_call(stage1):
    stock = IFImg2ImgPipeline(**stage1.components)
    pixels, timestep = if_pixels(test_image(), IF_STAGE1_SIZE), torch.tensor([500])
    args = (pixels, timestep, 1, 1, torch.float32, torch.device("cpu"))
    expected = stock.prepare_intermediate_images(*args, seeded_generator())
    assert torch.equal(stage1.prepare_intermediate_images(*args, seeded_generator()), expected)


# IF's step callback


def test_user_callback_follows_the_blend_every_callback_steps_and_stage2_passes_it_on(stage1, stage2):
    steps = 10
    x0 = if_pixels(test_image(), IF_STAGE1_SIZE)
    calls = []

    def record_then_zero_at_the_end(i, t, intermediate_images):
        calls.append((i, intermediate_images.clone()))
        if i == steps - 1:
            intermediate_images.zero_()  # IF's callback can only act in place; the result must show it

    result = stage1(PROMPT, image=test_image(), map=THREE_BANDS, num_inference_steps=steps, guidance_scale=1.0,
                    generator=seeded_generator(), output_type="pt", callback=record_then_zero_at_the_end,
                    callback_steps=3, **NO_CLEANING).images
    assert [i for i, _ in calls] == [0, 3, 6, 9]
    assert torch.equal(calls[-1][1][..., KEPT1], x0[..., KEPT1])  # the last call sees the kept pixels reset to x0
    assert torch.equal(result, torch.zeros_like(result))
    # Stage II passes the callback and its steps on.
    calls = []
    stage2(**stage2_inputs(), map=THREE_BANDS, prompt=PROMPT, num_inference_steps=4, guidance_scale=1.0,
           output_type="pt", callback=lambda i, t, images: calls.append(i), callback_steps=2, **NO_CLEANING)
    assert calls == [0, 2]


# Loading


def test_alias_is_the_class_but_not_a_second_module_member():
    module = importlib.import_module("IF.diff_pipe_I")
    from IF.diff_pipe_I import DiffIFImg2ImgPipeline

    assert DiffIFImg2ImgPipeline is IFDiffImg2ImgPipeline
    assert "DiffIFImg2ImgPipeline" not in dir(module)  # loading as a community pipeline: tests/test_conformance.py
    with pytest.raises(AttributeError, match="NoSuchPipeline"):
        module.NoSuchPipeline  # noqa: B018


def test_stage2_loads_without_its_text_encoder_or_naming_the_watermarker(if_stage2_dir):
    # Stock IFImg2ImgSuperResolutionPipeline would need watermarker=None to load this folder.
    by_class = IFDiffImg2ImgSuperResolutionPipeline.from_pretrained(if_stage2_dir, text_encoder=None)
    assert by_class.text_encoder is None and by_class.watermarker is None
    stock = IFImg2ImgSuperResolutionPipeline.from_pretrained(if_stage2_dir, watermarker=None)
    embeds, negative = stock.encode_prompt(PROMPT, **NO_CLEANING)
    results = []
    for pipe in (by_class, IFDiffImg2ImgSuperResolutionPipeline.from_pipe(stock)):
        pipe.set_progress_bar_config(disable=True)
        results.append(pipe(**stage2_inputs(), map=THREE_BANDS, prompt_embeds=embeds, negative_prompt_embeds=negative,
                            num_inference_steps=2, generator=seeded_generator(), output_type="pt").images)
    assert torch.equal(results[0], results[1])
