"""The ControlNet img2img pipelines against stock diffusers, on tiny random SD models with tiny ControlNets (#15)."""

import copy

import numpy as np
import pytest
import torch
from conftest import build_pipeline, count_unet_calls, make_scheduler, seeded_generator, test_image
from diffusers import (
    DiffusionPipeline,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
)

from SD2.diff_pipe_controlnet import StableDiffusionControlNetDiffImg2ImgPipeline
from SDXL.diff_pipe_controlnet import StableDiffusionXLControlNetDiffImg2ImgPipeline
from tests.tiny_models import sd_controlnet_components, sdxl_controlnet_components

PROMPT = "a red apple on a table"
LATENT = 32  # 64 px test images on a VAE with scale factor 2
BATCH_RTOL = 1e-4  # batched vs single runs: float32 sums in another order (see tests/test_sd2.py)


FAMILIES = {  # (stock, ours, components builder)
    "sd": (StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetDiffImg2ImgPipeline,
           sd_controlnet_components),
    "sdxl": (StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetDiffImg2ImgPipeline,
             sdxl_controlnet_components),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def components(family):
    return FAMILIES[family][2]()


def pipelines(family, components, scheduler="ddim"):
    stock, ours, _ = FAMILIES[family]
    components = {**components, "scheduler": make_scheduler(scheduler)}
    return build_pipeline(stock, components), build_pipeline(ours, components)


def control_image(seed=7):
    return test_image(seed=seed).transpose(0)  # a condition unlike the image itself


def three_band_map(size=64):
    """Left third kept, middle third at strength 0.5, right third changed fully."""
    keep_map = np.ones((size, size), np.float32)
    keep_map[:, size // 3 : 2 * size // 3] = 0.5
    keep_map[:, 2 * size // 3 :] = 0.0
    return keep_map


def independent_x0_and_noise(pipe, image, seed=0):
    """x0 and noise drawn as stock img2img draws them: VAE sample first, then noise, from one generator."""
    generator = seeded_generator(seed)
    pixels = pipe.image_processor.preprocess(image)
    x0 = pipe.vae.encode(pixels).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
    return x0, torch.randn(x0.shape, generator=generator)


def assert_close_to_single_run(batched, alone):
    batched, alone = np.asarray(batched), np.asarray(alone)
    np.testing.assert_allclose(batched, alone, rtol=BATCH_RTOL, atol=BATCH_RTOL * np.abs(alone).max())


def frozen_latents_check(pipe, run, release, steps):
    """Runs `pipe` on `three_band_map()` and checks every step's latents against add_noise(x0, noise, t_i).

    `release` gives the release steps of the kept, half and changed bands; returns the final latents and x0.
    """
    x0, noise = independent_x0_and_noise(pipe, run["image"])
    reference_scheduler = copy.deepcopy(pipe.scheduler)
    reference_scheduler.set_timesteps(steps)
    seen = []

    def record(pipe, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    final = pipe(**run, map=three_band_map(), num_inference_steps=steps, generator=seeded_generator(),
                 output_type="latent", callback_on_step_end=record).images
    bands = slice(0, LATENT // 3), slice(LATENT // 3 + 1, 2 * LATENT // 3 - 1), slice(-8, None)
    assert len(seen) == steps - min(release)
    for i, latents in enumerate(seen[:-1]):
        next_step = min(release) + i + 1
        noised = reference_scheduler.add_noise(x0, noise, reference_scheduler.timesteps[next_step : next_step + 1])
        for band, release_step in zip(bands, release):
            if next_step <= release_step:
                assert torch.equal(latents[..., band], noised[..., band]), (next_step, release_step)
            else:
                assert not torch.allclose(latents[..., band], noised[..., band], atol=1e-3), (next_step, release_step)
    kept, _, changed = bands
    assert torch.equal(final[..., kept], x0[..., kept])
    assert not torch.allclose(final[..., changed], x0[..., changed], atol=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# SD 1.x / 2.x and SDXL ControlNet img2img, each test on both


@pytest.mark.parametrize("scheduler, strength", [("ddim", 0.5), ("euler", 0.6), ("dpm++", 1.0), ("ddim", 0.35)])
def test_uniform_map_is_stock_controlnet_img2img(family, components, scheduler, strength):
    # T * s = 3, 3.6, 6 and 2.1 over 6 steps: integer and non-integer products.
    stock, ours = pipelines(family, components, scheduler)
    run = dict(image=test_image(), control_image=control_image(), num_inference_steps=6, output_type="np")
    expected = stock(PROMPT, strength=strength, generator=seeded_generator(), **run).images
    for keep, global_strength in [(0.0, strength), (1 - strength, 1.0)]:
        ours.scheduler = copy.deepcopy(stock.scheduler)
        result = ours(PROMPT, map=np.full((64, 64), keep, np.float32), strength=global_strength,
                      generator=seeded_generator(), **run).images
        assert np.array_equal(result, expected)
        assert ours.num_timesteps == int(6 * strength + 1e-9)


def test_a_strength_just_below_whole_steps_runs_as_many_steps_as_stock(family, components):
    # In float64, 50 * 0.58 is 28.999999999999996: stock runs int() of it, 28 steps, and so does a map of that
    # strength (no snapping to 29).
    stock, ours = pipelines(family, components)
    run = dict(image=test_image(), control_image=control_image(), num_inference_steps=50, output_type="latent")
    expected = stock(PROMPT, strength=0.58, generator=seeded_generator(), **run).images
    ours.scheduler = copy.deepcopy(stock.scheduler)
    result = ours(PROMPT, map=np.zeros((64, 64), np.float32), strength=0.58, generator=seeded_generator(),
                  **run).images
    assert torch.equal(result, expected) and ours.num_timesteps == stock.num_timesteps == 28


def test_the_control_image_steers_the_result(family, components):
    _, ours = pipelines(family, components)
    run = dict(image=test_image(), map=three_band_map(), num_inference_steps=4, output_type="np")
    first = ours(PROMPT, control_image=control_image(7), generator=seeded_generator(), **run).images
    second = ours(PROMPT, control_image=control_image(8), generator=seeded_generator(), **run).images
    assert np.abs(first - second).max() > 1e-3


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_frozen_pixels_follow_the_noised_original_and_kept_pixels_end_as_x0(family, components, scheduler):
    _, ours = pipelines(family, components, scheduler)
    run = dict(prompt=PROMPT, image=test_image(), control_image=control_image())
    frozen_latents_check(ours, run, release=(6, 3, 0), steps=6)


@pytest.mark.parametrize("max_strength, steps_run", [(0.5, 3), (0.35, 2), (0.2, 1)])
def test_a_map_releasing_k_steps_calls_unet_and_controlnet_k_times(family, components, max_strength, steps_run):
    _, ours = pipelines(family, components)
    unet_calls, controlnet_calls = count_unet_calls(ours), count_unet_calls(ours.controlnet)
    keep_map = np.ones((64, 64), np.float32)
    keep_map[:, 32:] = 1 - max_strength
    ours(PROMPT, image=test_image(), control_image=control_image(), map=keep_map, num_inference_steps=6,
         guidance_scale=1.0, generator=seeded_generator(), output_type="latent")
    assert len(unet_calls) == len(controlnet_calls) == steps_run == ours.num_timesteps
    unet_calls.stop(), controlnet_calls.stop()


def test_a_white_map_runs_no_step_and_returns_x0(family, components):
    _, ours = pipelines(family, components)
    calls = count_unet_calls(ours.controlnet)
    x0, _ = independent_x0_and_noise(ours, test_image())
    result = ours(PROMPT, image=test_image(), control_image=control_image(), map=np.ones((64, 64), np.float32),
                  generator=seeded_generator(), output_type="latent").images
    assert torch.equal(result, x0) and calls == [] and ours.num_timesteps == 0
    calls.stop()


def test_multi_controlnet_acts_as_in_stock(family):
    stock, ours = pipelines(family, FAMILIES[family][2](controlnets=2))
    run = dict(image=test_image(), control_image=[control_image(7), control_image(8)], num_inference_steps=6,
               controlnet_conditioning_scale=[0.8, 0.5], output_type="np")
    expected = stock(PROMPT, strength=0.5, generator=seeded_generator(), **run).images
    result = ours(PROMPT, map=np.full((64, 64), 0.5, np.float32), generator=seeded_generator(), **run).images
    assert np.array_equal(result, expected)
    calls = [count_unet_calls(net) for net in ours.controlnet.nets]
    swapped = ours(PROMPT, map=three_band_map(), generator=seeded_generator(),
                   **{**run, "control_image": [control_image(8), control_image(7)]}).images
    assert [len(c) for c in calls] == [6, 6]
    plain = ours(PROMPT, map=three_band_map(), generator=seeded_generator(), **run).images
    assert np.abs(swapped - plain).max() > 1e-3  # each ControlNet reads its own condition


def test_given_latents_start_the_first_step_as_in_stock(family, components):
    stock, ours = pipelines(family, components)
    latents = torch.randn(1, 4, LATENT, LATENT, generator=seeded_generator(9))
    run = dict(image=test_image(), control_image=control_image(), num_inference_steps=6, output_type="latent")
    expected = stock(PROMPT, strength=0.5, latents=latents, **run).images
    result = ours(PROMPT, map=np.full((64, 64), 0.5, np.float32), latents=latents, generator=seeded_generator(),
                  **run).images
    assert torch.equal(result, expected)


def test_batch_of_images_with_their_own_maps_equals_each_run_alone(family, components):
    _, ours = pipelines(family, components)
    images, controls = [test_image(seed=1), test_image(seed=2)], [control_image(7), control_image(8)]
    maps, prompts, seeds = [three_band_map(), 1 - three_band_map()], ["a red apple", "a blue pear"], [3, 4]
    run = dict(num_inference_steps=4, output_type="np")
    batch = ours(prompts, image=images, control_image=controls, map=maps,
                 generator=[seeded_generator(s) for s in seeds], **run).images
    for i in range(2):
        alone = ours(prompts[i], image=images[i], control_image=controls[i], map=maps[i],
                     generator=seeded_generator(seeds[i]), **run).images[0]
        assert_close_to_single_run(batch[i], alone)
    assert np.abs(batch[0] - batch[1]).max() > 1e-2


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(control_image=None), "control_image"),
        (dict(map=[np.zeros((64, 64))] * 3), "3 maps for 1 images"),
        (dict(strength=1.5), "strength"),
        (dict(latents=torch.zeros(1, 4, 8, 8)), "`latents` must be a tensor shaped like"),
    ],
)
def test_bad_arguments_are_refused_clearly(family, components, change, message):
    _, ours = pipelines(family, components)
    run = {**dict(image=test_image(), control_image=control_image(), map=np.zeros((64, 64), np.float32),
                  num_inference_steps=4), **change}
    with pytest.raises(ValueError, match=message):
        ours(PROMPT, **run)


def test_maps_follow_their_images_through_num_images_per_prompt(family, components):
    # Stock repeats the images as a whole batch (a, b, a, b), each prompt and control image in place (p0, p0, p1,
    # p1): the maps must follow the images.
    _, ours = pipelines(family, components)
    images, controls = [test_image(seed=1), test_image(seed=2)], [control_image(7), control_image(8)]
    maps, seeds = [three_band_map(), 1 - three_band_map()], [3, 4, 5, 6]
    run = dict(num_inference_steps=4, output_type="np")
    batch = ours(["a red apple", "a blue pear"], image=images, control_image=controls, map=maps,
                 num_images_per_prompt=2, generator=[seeded_generator(s) for s in seeds], **run).images
    written_out = ours(["a red apple", "a red apple", "a blue pear", "a blue pear"], image=images * 2,
                       control_image=[controls[0], controls[0], controls[1], controls[1]], map=maps * 2,
                       generator=[seeded_generator(s) for s in seeds], **run).images
    assert_close_to_single_run(batch, written_out)


def test_the_file_loads_as_a_community_pipeline(family, components, tmp_path):
    stock, ours = pipelines(family, components)
    stock.save_pretrained(tmp_path)
    file = {"sd": "SD2/diff_pipe_controlnet.py", "sdxl": "SDXL/diff_pipe_controlnet.py"}[family]
    loaded = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=file, trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == FAMILIES[family][1].__name__
    run = dict(image=test_image(), control_image=control_image(), map=three_band_map(), num_inference_steps=4,
               output_type="np")
    expected = ours(PROMPT, generator=seeded_generator(), **run).images
    assert np.array_equal(loaded(PROMPT, generator=seeded_generator(), **run).images, expected)
