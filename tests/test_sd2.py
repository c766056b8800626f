"""StableDiffusionDiffImg2ImgPipeline against stock diffusers, on a tiny random SD model."""

import copy

import numpy as np
import pytest
import torch
from conftest import build_pipeline, count_unet_calls, make_scheduler, sd_components, seeded_generator, test_image
from diffusers import DiffusionPipeline, StableDiffusionImg2ImgPipeline
from diffusers.callbacks import SDCFGCutoffCallback

from SD2.diff_pipe import StableDiffusionDiffImg2ImgPipeline

PROMPT = "a red apple on a table"
LATENT = 32  # 64 px test images on a VAE with scale factor 2


# Batched and single runs add the same float32 products in other orders (other kernel shapes). Sums of ~1e3 terms
# then differ by up to ~1e3 * 2**-24, about 1e-4 of their magnitude, which is also far below what a map applied to
# the wrong item would change.
BATCH_RTOL = 1e-4


def assert_close_to_single_run(batched, alone):
    batched, alone = np.asarray(batched), np.asarray(alone)
    np.testing.assert_allclose(batched, alone, rtol=BATCH_RTOL, atol=BATCH_RTOL * np.abs(alone).max())


@pytest.fixture(scope="module")
def components():
    return sd_components()


def pipelines(components, scheduler="ddim"):
    components = {**components, "scheduler": make_scheduler(scheduler)}
    return build_pipeline(StableDiffusionImg2ImgPipeline, components), build_pipeline(
        StableDiffusionDiffImg2ImgPipeline, components
    )


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


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0])
def test_uniform_map_is_stock_img2img(components, scheduler, strength):
    stock, ours = pipelines(components, scheduler)
    image, steps = test_image(), 8
    expected = stock(PROMPT, image=image, strength=strength, num_inference_steps=steps,
                     generator=seeded_generator(), output_type="np").images
    # A black map at global strength s, and a gray map 1 - s at strength 1: both are s everywhere.
    for keep, global_strength in [(0.0, strength), (1 - strength, 1.0)]:
        ours.scheduler = copy.deepcopy(stock.scheduler)
        keep_map = np.full((64, 64), keep, np.float32)
        result = ours(PROMPT, image=image, map=keep_map, strength=global_strength, num_inference_steps=steps,
                      generator=seeded_generator(), output_type="np").images
        assert np.array_equal(result, expected)
        assert ours.num_timesteps == int(steps * strength)


def test_a_black_map_where_stock_product_falls_just_off_an_integer_runs_stock_steps(components):
    # Stock runs int(100 * 0.29) = int(28.999999999999996) = 28 steps; so must a black map at strength 0.29.
    stock, ours = pipelines(components)
    run = dict(image=test_image(), strength=0.29, num_inference_steps=100, output_type="np")
    expected = stock(PROMPT, generator=seeded_generator(), **run).images
    calls = count_unet_calls(ours)
    result = ours(PROMPT, map=np.zeros((64, 64), np.uint8), generator=seeded_generator(), **run).images
    assert len(calls) == ours.num_timesteps == stock.num_timesteps == 28
    assert np.array_equal(result, expected)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_frozen_pixels_follow_the_noised_original_and_kept_pixels_end_as_x0(components, scheduler):
    _, ours = pipelines(components, scheduler)
    image, keep_map, steps = test_image(), three_band_map(), 10
    x0, noise = independent_x0_and_noise(ours, image)
    reference_scheduler = copy.deepcopy(ours.scheduler)
    reference_scheduler.set_timesteps(steps)
    seen = []

    def record(pipe, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    final = ours(PROMPT, image=image, map=keep_map, num_inference_steps=steps, generator=seeded_generator(),
                 output_type="latent", callback_on_step_end=record).images

    # Columns of the latent grid: kept (release step 10), half (release step 5), changed (release step 0).
    kept, half, changed = slice(0, LATENT // 3), slice(LATENT // 3 + 1, 2 * LATENT // 3 - 1), slice(-8, None)
    assert len(seen) == steps  # the changed band releases at step 0, so every step runs
    for i, latents in enumerate(seen[:-1]):
        next_step = i + 1
        timestep = reference_scheduler.timesteps[next_step : next_step + 1]
        noised = reference_scheduler.add_noise(x0, noise, timestep)
        assert torch.equal(latents[..., kept], noised[..., kept])
        if next_step <= 5:
            assert torch.equal(latents[..., half], noised[..., half])
        else:
            assert not torch.allclose(latents[..., half], noised[..., half], atol=1e-3)
        assert not torch.allclose(latents[..., changed], noised[..., changed], atol=1e-3)
    assert torch.equal(final[..., kept], x0[..., kept])
    assert not torch.allclose(final[..., changed], x0[..., changed], atol=1e-2)


@pytest.mark.parametrize("max_strength, unet_calls", [(0.5, 10), (0.3, 6), (0.05, 1)])
def test_steps_before_the_first_release_never_run(components, max_strength, unet_calls):
    _, ours = pipelines(components)
    calls = count_unet_calls(ours)
    keep_map = np.ones((64, 64), np.float32)
    keep_map[:, 32:] = 1 - max_strength
    ours(PROMPT, image=test_image(), map=keep_map, num_inference_steps=20, guidance_scale=1.0,
         generator=seeded_generator(), output_type="latent")
    assert len(calls) == unet_calls == ours.num_timesteps


def test_a_white_map_runs_no_step_and_returns_the_original(components):
    _, ours = pipelines(components)
    calls = count_unet_calls(ours)
    image = test_image()
    x0, _ = independent_x0_and_noise(ours, image)
    for keep_map, strength in [(np.ones((64, 64), np.float32), 1.0), (three_band_map(), 0.0)]:
        result = ours(PROMPT, image=image, map=keep_map, strength=strength, generator=seeded_generator(),
                      output_type="latent").images
        assert torch.equal(result, x0)
    assert calls == [] and ours.num_timesteps == 0
    pixels = ours(PROMPT, image=image, map=np.ones((64, 64), np.float32), generator=seeded_generator(),
                  output_type="pt").images
    decoded = ours.vae.decode(x0 / ours.vae.config.scaling_factor, generator=seeded_generator()).sample
    assert torch.equal(pixels, (decoded / 2 + 0.5).clamp(0, 1))


def test_invert_map_is_the_exact_mirror(components):
    _, ours = pipelines(components)
    keep_map = three_band_map()
    run = dict(image=test_image(), num_inference_steps=10, output_type="np")
    inverted = ours(PROMPT, map=1 - keep_map, invert_map=True, generator=seeded_generator(), **run).images
    plain = ours(PROMPT, map=keep_map, generator=seeded_generator(), **run).images
    assert np.array_equal(inverted, plain)
    flipped = ours(PROMPT, map=keep_map, invert_map=True, generator=seeded_generator(), **run).images
    assert not np.allclose(flipped, plain, atol=1e-3)


def test_num_images_per_prompt_items_equal_each_run_alone(components):
    _, ours = pipelines(components)
    run = dict(image=test_image(), map=three_band_map(), num_inference_steps=6, output_type="np")
    batch = ours(PROMPT, num_images_per_prompt=2, generator=[seeded_generator(1), seeded_generator(2)], **run).images
    for item, seed in zip(batch, [1, 2]):
        alone = ours(PROMPT, generator=seeded_generator(seed), **run).images[0]
        assert_close_to_single_run(item, alone)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3


def test_batch_of_images_with_their_own_maps_equals_each_run_alone(components):
    _, ours = pipelines(components)
    images, maps = [test_image(seed=1), test_image(seed=2)], [three_band_map(), 1 - three_band_map()]
    prompts, seeds = ["a red apple", "a blue pear"], [3, 4]
    run = dict(num_inference_steps=6, output_type="np")
    batch = ours(prompts, image=images, map=maps, generator=[seeded_generator(s) for s in seeds], **run).images
    for i in range(2):
        alone = ours(prompts[i], image=images[i], map=maps[i], generator=seeded_generator(seeds[i]), **run).images[0]
        assert_close_to_single_run(batch[i], alone)


def test_one_map_is_shared_by_a_batch(components):
    _, ours = pipelines(components)
    images, prompts = [test_image(seed=1), test_image(seed=2)], ["a red apple", "a blue pear"]
    generators = lambda: [seeded_generator(5), seeded_generator(6)]  # noqa: E731
    run = dict(image=images, num_inference_steps=6, output_type="np")
    shared = ours(prompts, map=three_band_map(), generator=generators(), **run).images
    repeated = ours(prompts, map=[three_band_map()] * 2, generator=generators(), **run).images
    assert np.array_equal(shared, repeated)


def test_user_step_end_callback_sees_blended_latents_and_can_change_them(components):
    _, ours = pipelines(components)
    steps_seen = []

    def zero_latents_at_the_end(pipe, i, t, kwargs):
        steps_seen.append(i)
        if i == pipe.num_timesteps - 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return kwargs

    result = ours(PROMPT, image=test_image(), map=three_band_map(), num_inference_steps=10, output_type="latent",
                  generator=seeded_generator(), callback_on_step_end=zero_latents_at_the_end).images
    assert steps_seen == list(range(10))
    assert torch.equal(result, torch.zeros_like(result))


def test_pipeline_callback_objects_work(components):
    stock, ours = pipelines(components)
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=0.5)
    run = dict(image=test_image(), num_inference_steps=6, output_type="np", callback_on_step_end=cutoff)
    expected = stock(PROMPT, strength=1.0, generator=seeded_generator(), **run).images
    result = ours(PROMPT, map=np.zeros((64, 64), np.float32), generator=seeded_generator(), **run).images
    assert np.array_equal(result, expected)


def test_loading_from_a_folder_as_class_and_as_custom_pipeline(sd_dir, components):
    by_class = StableDiffusionDiffImg2ImgPipeline.from_pretrained(sd_dir)
    by_custom = DiffusionPipeline.from_pretrained(sd_dir, custom_pipeline="SD2/diff_pipe.py", trust_remote_code=True)
    assert type(by_custom).__name__ == "StableDiffusionDiffImg2ImgPipeline"
    from_pipe = StableDiffusionDiffImg2ImgPipeline.from_pipe(StableDiffusionImg2ImgPipeline.from_pretrained(sd_dir))
    run = dict(image=test_image(), map=three_band_map(), num_inference_steps=4, output_type="np")
    results = []
    for pipe in (by_class, by_custom, from_pipe):
        pipe.set_progress_bar_config(disable=True)
        results.append(pipe(PROMPT, generator=seeded_generator(), **run).images)
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(map=[np.zeros((64, 64))] * 3), "3 maps for 1 images"),
        (dict(map=np.zeros((64, 32))), "aspect ratio"),
        (dict(map=None), "`map`"),
        (dict(strength=1.5), "strength"),
        (dict(num_inference_steps=0), "num_inference_steps"),
    ],
)
def test_bad_arguments_are_refused_clearly(components, change, message):
    _, ours = pipelines(components)
    run = {**dict(image=test_image(), map=np.zeros((64, 64), np.float32), num_inference_steps=4), **change}
    with pytest.raises(ValueError, match=message):
        ours(PROMPT, **run)


def test_keep_exact_returns_the_input_bytes_where_strength_is_zero(components):
    _, ours = pipelines(components)
    image, keep_map = test_image(), three_band_map()
    run = dict(image=image, map=keep_map, num_inference_steps=10, generator=seeded_generator())
    exact = np.asarray(ours(PROMPT, keep_exact=True, **run).images[0])
    kept = keep_map == 1.0
    assert np.array_equal(exact[kept], np.asarray(image)[kept])
    assert not np.array_equal(exact[~kept], np.asarray(image)[~kept])
    run["generator"] = seeded_generator()
    plain = ours(PROMPT, output_type="np", **run).images[0]
    run["generator"] = seeded_generator()
    exact_np = ours(PROMPT, output_type="np", keep_exact=True, **run).images[0]
    assert np.array_equal(exact_np[~kept], plain[~kept])  # strength >= 1/T: the model's output, untouched


def test_keep_exact_with_nothing_to_change_is_the_input_itself(components):
    _, ours = pipelines(components)
    calls = count_unet_calls(ours)
    image = test_image()
    result = ours(PROMPT, image=image, map=np.ones((64, 64), np.float32), keep_exact=True).images[0]
    assert np.array_equal(np.asarray(result), np.asarray(image)) and calls == []


def test_keep_exact_blends_strengths_below_one_step_linearly(components):
    _, ours = pipelines(components)
    steps, strength = 10, 0.05  # T * s = 0.5: never released, shown at half weight
    keep_map = np.full((64, 64), 1 - strength, np.float32)
    keep_map[:, 32:] = 0.0
    run = dict(image=test_image(), map=keep_map, num_inference_steps=steps, output_type="pt")
    exact = ours(PROMPT, keep_exact=True, generator=seeded_generator(), **run).images
    plain = ours(PROMPT, generator=seeded_generator(), **run).images
    original = ours.image_processor.preprocess(test_image()) / 2 + 0.5
    expected = 0.5 * plain[..., :32] + 0.5 * original[..., :32]
    # The weight is T * (1 - float32(0.95)), one float32 rounding away from 0.5.
    assert torch.allclose(exact[..., :32], expected, rtol=0, atol=1e-6)


def test_keep_exact_refuses_latent_output(components):
    _, ours = pipelines(components)
    with pytest.raises(ValueError, match="keep_exact"):
        ours(PROMPT, image=test_image(), map=three_band_map(), keep_exact=True, output_type="latent")


def test_maps_follow_their_images_through_num_images_per_prompt(components):
    # Stock repeats the image batch as a whole for num_images_per_prompt (a, b, a, b) while it repeats each
    # prompt in place (p0, p0, p1, p1): the maps must follow the images, not the prompts.
    _, ours = pipelines(components)
    images, maps = [test_image(seed=1), test_image(seed=2)], [three_band_map(), 1 - three_band_map()]
    seeds = [3, 4, 5, 6]
    for keep_exact in (False, True):
        run = dict(num_inference_steps=6, output_type="np", keep_exact=keep_exact)
        batch = ours(["a red apple", "a blue pear"], image=images, map=maps, num_images_per_prompt=2,
                     generator=[seeded_generator(s) for s in seeds], **run).images
        written_out = ours(["a red apple", "a red apple", "a blue pear", "a blue pear"], image=images * 2,
                           map=maps * 2, generator=[seeded_generator(s) for s in seeds], **run).images
        # The text encoder runs two prompts against four: float32 may round them apart in the last bits.
        assert np.abs(batch - written_out).max() <= 1e-5


def test_a_map_with_no_kept_region_freezes_until_release_and_ends_nothing_as_x0(components):
    # Keep 0.5 on the left half, 0.0 on the right, no white: the last frozen step is 5, not T, and no pixel is
    # left unreleased to be set to x0 at the end.
    _, ours = pipelines(components)
    image, steps = test_image(), 10
    keep_map = np.full((64, 64), 0.5, np.float32)
    keep_map[:, 32:] = 0.0
    x0, noise = independent_x0_and_noise(ours, image)
    reference_scheduler = copy.deepcopy(ours.scheduler)
    reference_scheduler.set_timesteps(steps)
    seen = []

    def record(pipe, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    final = ours(PROMPT, image=image, map=keep_map, num_inference_steps=steps, generator=seeded_generator(),
                 output_type="latent", callback_on_step_end=record).images

    half, changed = slice(0, LATENT // 2), slice(LATENT // 2, None)
    assert len(seen) == steps
    for i, latents in enumerate(seen[:-1]):
        next_step = i + 1
        noised = reference_scheduler.add_noise(x0, noise, reference_scheduler.timesteps[next_step : next_step + 1])
        if next_step <= 5:
            assert torch.equal(latents[..., half], noised[..., half])
        else:
            assert not torch.allclose(latents[..., half], noised[..., half], atol=1e-3)
        assert not torch.allclose(latents[..., changed], noised[..., changed], atol=1e-3)
    # Every latent pixel, in both bands, ends as the model left it, well away from x0.
    assert (final - x0).abs().amax(dim=1).min() > 1e-2


def test_keep_exact_with_a_global_strength_below_one_blends_half_and_half(components):
    # The weight is clamp(T * strength * (1 - map), 0, 1): keep 0.9 at strength 0.5 over 10 steps gives 0.5.
    _, ours = pipelines(components)
    keep_map = np.full((64, 64), 0.9, np.float32)
    keep_map[:, 32:] = 0.0  # strength 0.5 here: released at step 5, so steps run
    run = dict(image=test_image(), map=keep_map, strength=0.5, num_inference_steps=10, output_type="pt")
    exact = ours(PROMPT, keep_exact=True, generator=seeded_generator(), **run).images
    plain = ours(PROMPT, generator=seeded_generator(), **run).images
    original = ours.image_processor.preprocess(test_image()) / 2 + 0.5
    assert (plain[..., :32] - original[..., :32]).abs().max() > 0.1  # the VAE round trip is far from the input
    # float32 keeps 1 - 0.9 as 0.10000002: the weight is 0.5000001.
    assert torch.allclose(exact[..., :32], 0.5 * plain[..., :32] + 0.5 * original[..., :32], atol=1e-6)
    assert torch.equal(exact[..., 32:], plain[..., 32:])
