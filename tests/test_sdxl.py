"""StableDiffusionXLDiffImg2ImgPipeline against stock diffusers, base alone and base + refiner, on tiny SDXL models."""

import copy

import numpy as np
import pytest
import torch
from conftest import (
    build_pipeline,
    count_unet_calls,
    make_scheduler,
    sdxl_components,
    sdxl_refiner_components,
    seeded_generator,
    test_image,
)
from diffusers import DiffusionPipeline, HeunDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
from diffusers.callbacks import SDXLCFGCutoffCallback

from SDXL.diff_pipe import StableDiffusionXLDiffImg2ImgPipeline

PROMPT = "a red apple on a table"
LATENT = 32  # 64 px test images on a VAE with scale factor 2
STEPS = 10
SPLIT = 0.65  # stock hands over at timestep 1000 * (1 - 0.65) = 350
HANDOFF = 6  # with 10 Euler steps (timesteps 901, 801, ..., 1), the refiner starts at step 6


# Batched and single runs add the same float32 products in other orders (other kernel shapes). Sums of ~1e3 terms
# then differ by up to ~1e3 * 2**-24, about 1e-4 of their magnitude, which is also far below what a map applied to
# the wrong item would change.
BATCH_RTOL = 1e-4


def assert_close_to_single_run(batched, alone):
    batched, alone = np.asarray(batched), np.asarray(alone)
    np.testing.assert_allclose(batched, alone, rtol=BATCH_RTOL, atol=BATCH_RTOL * np.abs(alone).max())


@pytest.fixture(scope="module")
def components():
    base = sdxl_components()
    return base, sdxl_refiner_components(base)  # the refiner shares the base's VAE and second text encoder


def pipelines(components, scheduler="euler", cls=StableDiffusionXLDiffImg2ImgPipeline):
    """(base, refiner) of class `cls`, each with its own fresh scheduler."""
    return tuple(build_pipeline(cls, {**c, "scheduler": make_scheduler(scheduler)}) for c in components)


def bands(*keeps, size=64):
    """A keep map of vertical bands of (nearly) equal width, left to right."""
    column_band = np.arange(size) * len(keeps) // size
    return np.repeat(np.asarray(keeps, np.float32)[column_band][None], size, axis=0)


def band(i, count):
    """Latent columns of band i of `count`."""
    width = LATENT // count
    return slice(i * width, (i + 1) * width)


# Kept (never released), released at step 8 (in the refiner), at step 5 (in the base), at step 0.
FOUR_BANDS = bands(1.0, 0.8, 0.5, 0.0)
RELEASE = [STEPS, 8, 5, 0]


def independent_x0_and_noise(pipe, image, seed=0):
    """x0 and noise drawn as stock img2img draws them: VAE sample first, then noise, from one generator."""
    generator = seeded_generator(seed)
    pixels = pipe.image_processor.preprocess(image)
    x0 = pipe.vae.encode(pixels).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
    return x0, torch.randn(x0.shape, generator=generator)


def reference_scheduler(pipe, steps=STEPS):
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    return scheduler


def noised(scheduler, x0, noise, step):
    return scheduler.add_noise(x0, noise, scheduler.timesteps[step : step + 1])


def handoff_step(pipe):
    """The first step below the split's timestep, 350, on the scheduler's schedule of STEPS steps."""
    return int((reference_scheduler(pipe).timesteps >= 350).sum())


def recorder(seen, first_step):
    """A step-end callback that stores (index of the next step, latents) on the global schedule."""

    def record(pipe, i, t, kwargs):
        seen.append((first_step + i + 1, kwargs["latents"].clone()))
        return kwargs

    return record


def capture_start_latents(pipe):
    """Records what prepare_latents hands the denoising loop: the input of the first step that runs."""
    captured, prepare = [], pipe.prepare_latents

    def prepare_and_record(*args, **kwargs):
        captured.append(prepare(*args, **kwargs))
        return captured[-1]

    pipe.prepare_latents = prepare_and_record
    return captured


def split_run(base, refiner, image, keep_map, split=SPLIT, steps=STEPS, seed=0, base_callback=None,
              refiner_callback=None, output_type="latent", keep_exact_in_refiner=False, **common):
    latents = base(PROMPT, image=image, map=keep_map, num_inference_steps=steps, denoising_end=split,
                   generator=seeded_generator(seed), output_type="latent", callback_on_step_end=base_callback,
                   **common).images
    final = refiner(PROMPT, image=latents, original_image=image, map=keep_map, num_inference_steps=steps,
                    denoising_start=split, generator=seeded_generator(seed), output_type=output_type,
                    callback_on_step_end=refiner_callback, keep_exact=keep_exact_in_refiner, **common).images
    return latents, final


# ---------------------------------------------------------------------------------------------------------------
# Stock equivalence


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0])
def test_uniform_map_is_stock_img2img(components, scheduler, strength):
    (stock, _), (ours, _) = pipelines(components, scheduler, StableDiffusionXLImg2ImgPipeline), pipelines(components)
    image, steps = test_image(), 8
    expected = stock(PROMPT, image=image, strength=strength, num_inference_steps=steps,
                     generator=seeded_generator(), output_type="np").images
    # A black map at global strength s, and a gray map 1 - s at strength 1: both are s everywhere.
    for keep, global_strength in [(0.0, strength), (1 - strength, 1.0)]:
        ours.scheduler = make_scheduler(scheduler)
        keep_map = np.full((64, 64), keep, np.float32)
        result = ours(PROMPT, image=image, map=keep_map, strength=global_strength, num_inference_steps=steps,
                      generator=seeded_generator(), output_type="np").images
        assert np.array_equal(result, expected)
        assert ours.num_timesteps == int(steps * strength)


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_uniform_map_through_base_and_refiner_is_stock_base_and_refiner(components, scheduler, strength):
    stock_base, stock_refiner = pipelines(components, scheduler, StableDiffusionXLImg2ImgPipeline)
    base, refiner = pipelines(components, scheduler)
    image = test_image()
    stock_latents = stock_base(PROMPT, image=image, strength=strength, num_inference_steps=STEPS,
                               denoising_end=SPLIT, generator=seeded_generator(), output_type="latent").images
    expected = stock_refiner(PROMPT, image=stock_latents, num_inference_steps=STEPS, denoising_start=SPLIT,
                             generator=seeded_generator(), output_type="np").images
    keep_map = np.full((64, 64), 1 - strength, np.float32)
    latents, result = split_run(base, refiner, image, keep_map, output_type="np")
    assert torch.equal(latents, stock_latents)
    assert np.array_equal(result, expected)
    assert (base.num_timesteps, refiner.num_timesteps) == (stock_base.num_timesteps, stock_refiner.num_timesteps)
    assert base.num_timesteps + refiner.num_timesteps == int(STEPS * strength)


# ---------------------------------------------------------------------------------------------------------------
# Frozen and kept pixels, across the handoff


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
def test_frozen_pixels_follow_the_noised_original_across_the_handoff(components, scheduler):
    base, refiner = pipelines(components, scheduler)
    image = test_image()
    x0, noise = independent_x0_and_noise(base, image)
    reference, handoff = reference_scheduler(base), handoff_step(base)
    assert 5 < handoff < 8  # between the bands released at 5 and at 8
    seen = []
    latents, final = split_run(base, refiner, image, FOUR_BANDS, base_callback=recorder(seen, 0),
                               refiner_callback=recorder(seen, handoff))

    assert [step for step, _ in seen] == list(range(1, STEPS + 1))  # every step ran once, in one stage or the other
    assert (base.num_timesteps, refiner.num_timesteps) == (handoff, STEPS - handoff)
    assert torch.equal(latents, seen[handoff - 1][1])  # the base returns the input of the refiner's first step
    for step, step_latents in seen[:-1]:
        expected = noised(reference, x0, noise, step)
        for i, release in enumerate(RELEASE):
            columns = band(i, len(RELEASE))
            if step <= release:
                assert torch.equal(step_latents[..., columns], expected[..., columns]), (step, release)
            else:
                assert not torch.allclose(step_latents[..., columns], expected[..., columns], atol=1e-3)
    kept = band(0, len(RELEASE))
    assert not torch.allclose(latents[..., kept], x0[..., kept], atol=1e-2)  # not x0 before the true end
    assert torch.equal(final[..., kept], x0[..., kept])
    for i in range(1, len(RELEASE)):
        assert not torch.allclose(final[..., band(i, 4)], x0[..., band(i, 4)], atol=1e-2)


@pytest.mark.parametrize("given_as", ["image", "latents"])
def test_pixels_released_after_the_refiner_starts_are_frozen_whatever_it_starts_from(components, given_as):
    _, refiner = pipelines(components)
    image = test_image()
    x0, noise = independent_x0_and_noise(refiner, image)
    start = torch.randn(1, 4, LATENT, LATENT, generator=seeded_generator(9))
    captured = capture_start_latents(refiner)
    refiner_input = {"image": start} if given_as == "image" else {"image": torch.zeros_like(start), "latents": start}
    refiner(PROMPT, original_image=image, map=FOUR_BANDS, num_inference_steps=STEPS, denoising_start=SPLIT,
            generator=seeded_generator(), output_type="latent", **refiner_input)
    (first_input,) = captured
    expected = noised(reference_scheduler(refiner), x0, noise, HANDOFF)
    for i, release in enumerate(RELEASE):
        columns = band(i, len(RELEASE))
        source = expected if release > HANDOFF else start  # released by the base: the latents handed over
        assert torch.equal(first_input[..., columns], source[..., columns])


def test_noise_argument_ties_the_stages_without_a_generator(components):
    base, refiner = pipelines(components)
    x0 = torch.randn(1, 4, LATENT, LATENT, generator=seeded_generator(3))  # 4-channel images are x0 themselves
    noise = torch.randn(1, 4, LATENT, LATENT, generator=seeded_generator(4))
    reference = reference_scheduler(base)
    seen = []
    base_latents = base(PROMPT, image=x0, map=FOUR_BANDS, num_inference_steps=STEPS, denoising_end=SPLIT,
                        noise=noise, output_type="latent", callback_on_step_end=recorder(seen, 0)).images
    final = refiner(PROMPT, image=base_latents, original_image=x0, map=FOUR_BANDS, num_inference_steps=STEPS,
                    denoising_start=SPLIT, noise=noise, output_type="latent",
                    callback_on_step_end=recorder(seen, HANDOFF)).images
    for step, step_latents in seen[:-1]:
        expected = noised(reference, x0, noise, step)
        for i, release in enumerate(RELEASE):
            if step <= release:
                assert torch.equal(step_latents[..., band(i, 4)], expected[..., band(i, 4)])
    assert torch.equal(final[..., band(0, 4)], x0[..., band(0, 4)])


# ---------------------------------------------------------------------------------------------------------------
# Steps that have nothing to do


def test_steps_before_the_first_release_never_run(components):
    base, refiner = pipelines(components)
    base_calls, refiner_calls = count_unet_calls(base), count_unet_calls(refiner)
    keep_map = bands(1.0, 0.7)  # strongest pixel 0.3: released at step 7 of 10, after the handoff at 6
    image, x0_noise = test_image(), independent_x0_and_noise(base, test_image())
    latents, final = split_run(base, refiner, image, keep_map, guidance_scale=1.0)
    # The base has no step to run: it returns the input of step 6, where every pixel is still frozen.
    assert base_calls == [] and base.num_timesteps == 0
    assert torch.equal(latents, noised(reference_scheduler(base), *x0_noise, HANDOFF))
    # The refiner starts at the first release, from the original, as the refiner alone on the image would.
    assert len(refiner_calls) == refiner.num_timesteps == 3
    alone = refiner(PROMPT, image=image, map=keep_map, num_inference_steps=STEPS, guidance_scale=1.0,
                    generator=seeded_generator(), output_type="latent").images
    assert torch.equal(final, alone)


def test_a_white_map_runs_no_step_and_returns_the_original(components):
    base, refiner = pipelines(components)
    base_calls, refiner_calls = count_unet_calls(base), count_unet_calls(refiner)
    image = test_image()
    x0, _ = independent_x0_and_noise(base, image)
    white = np.ones((64, 64), np.float32)
    for keep_map, strength in [(white, 1.0), (FOUR_BANDS, 0.0)]:
        alone = base(PROMPT, image=image, map=keep_map, strength=strength, generator=seeded_generator(),
                     output_type="latent").images
        assert torch.equal(alone, x0)
        _, final = split_run(base, refiner, image, keep_map, strength=strength)
        assert torch.equal(final, x0)
    assert base_calls == refiner_calls == [] and base.num_timesteps == refiner.num_timesteps == 0
    pixels = base(PROMPT, image=image, map=white, generator=seeded_generator(), output_type="pt").images
    decoded = base.vae.decode(x0 / base.vae.config.scaling_factor).sample
    assert torch.equal(pixels, (decoded / 2 + 0.5).clamp(0, 1))


def test_a_refiner_with_no_step_left_ends_the_schedule(components):
    _, refiner = pipelines(components)
    image = test_image()
    x0, _ = independent_x0_and_noise(refiner, image)
    handed_over = torch.randn(1, 4, LATENT, LATENT, generator=seeded_generator(5))
    # 0.9995 puts stock's cutoff at timestep 0, after the last step
    final = refiner(PROMPT, image=handed_over, original_image=image, map=FOUR_BANDS, num_inference_steps=STEPS,
                    denoising_start=0.9995, generator=seeded_generator(), output_type="latent").images
    assert refiner.num_timesteps == 0
    assert torch.equal(final[..., band(0, 4)], x0[..., band(0, 4)])  # kept pixels become x0 at the end
    assert torch.equal(final[..., 8:], handed_over[..., 8:])


# ---------------------------------------------------------------------------------------------------------------
# Batches, user latents, callbacks, input types


def test_batch_of_images_with_their_own_maps_equals_each_run_alone(components):
    base, refiner = pipelines(components)
    images, maps = [test_image(seed=1), test_image(seed=2)], [FOUR_BANDS, np.ascontiguousarray(FOUR_BANDS[:, ::-1])]
    prompts, seeds = ["a red apple", "a blue pear"], [3, 4]
    steps = dict(num_inference_steps=STEPS, output_type="np")
    latents = base(prompts, image=images, map=maps, denoising_end=SPLIT, output_type="latent",
                   generator=[seeded_generator(s) for s in seeds], num_inference_steps=STEPS).images
    batch = refiner(prompts, image=latents, original_image=images, map=maps, denoising_start=SPLIT,
                    generator=[seeded_generator(s) for s in seeds], **steps).images
    for i in range(2):
        alone_latents = base(prompts[i], image=images[i], map=maps[i], denoising_end=SPLIT, output_type="latent",
                             generator=seeded_generator(seeds[i]), num_inference_steps=STEPS).images
        alone = refiner(prompts[i], image=alone_latents, original_image=images[i], map=maps[i],
                        denoising_start=SPLIT, generator=seeded_generator(seeds[i]), **steps).images[0]
        assert_close_to_single_run(latents[i], alone_latents[0])
        assert_close_to_single_run(batch[i], alone)


def test_num_images_per_prompt_items_equal_each_run_alone(components):
    base, refiner = pipelines(components)
    image, generators = test_image(), lambda: [seeded_generator(1), seeded_generator(2)]  # noqa: E731
    latents = base(PROMPT, image=image, map=FOUR_BANDS, num_images_per_prompt=2, denoising_end=SPLIT,
                   num_inference_steps=STEPS, generator=generators(), output_type="latent").images
    batch = refiner(PROMPT, image=latents, original_image=image, map=FOUR_BANDS, num_images_per_prompt=2,
                    denoising_start=SPLIT, num_inference_steps=STEPS, generator=generators(), output_type="np").images
    for item, seed in zip(batch, [1, 2]):
        _, alone = split_run(base, refiner, image, FOUR_BANDS, seed=seed, output_type="np")
        assert_close_to_single_run(item, alone[0])
    assert np.abs(batch[0] - batch[1]).max() > 1e-3


def test_user_latents_replace_the_start_as_in_stock(components):
    (stock, _), (ours, _) = pipelines(components, cls=StableDiffusionXLImg2ImgPipeline), pipelines(components)
    image, start = test_image(), torch.randn(1, 4, LATENT, LATENT, generator=seeded_generator(7))
    run = dict(image=image, num_inference_steps=8, latents=start, generator=seeded_generator(), output_type="np")
    expected = stock(PROMPT, strength=0.5, **run).images
    result = ours(PROMPT, map=np.full((64, 64), 0.5, np.float32), **{**run, "generator": seeded_generator()}).images
    assert np.array_equal(result, expected)


def test_user_latents_start_the_released_pixels_and_frozen_ones_keep_the_drawn_noise(components):
    ours = pipelines(components)[0]
    image, start = test_image(), torch.randn(1, 4, LATENT, LATENT, generator=seeded_generator(7))
    x0, noise = independent_x0_and_noise(ours, image)
    reference = reference_scheduler(ours)
    captured, seen = capture_start_latents(ours), []
    keep_map = bands(1.0, 0.5, 0.0)
    ours(PROMPT, image=image, map=keep_map, num_inference_steps=STEPS, latents=start, generator=seeded_generator(),
         output_type="latent", callback_on_step_end=recorder(seen, 0))
    third = lambda i: slice(i * 11, i * 11 + 10)  # noqa: E731  (columns well inside each third of the grid)
    assert torch.equal(captured[0][..., third(2)], start[..., third(2)])  # released at step 0: the user's latents
    for step, latents in [(0, captured[0])] + seen[:5]:
        expected = noised(reference, x0, noise, step)
        assert torch.equal(latents[..., third(0)], expected[..., third(0)])
        assert torch.equal(latents[..., third(1)], expected[..., third(1)])


def test_user_step_end_callback_sees_blended_latents_in_both_stages_and_can_change_them(components):
    base, refiner = pipelines(components)
    steps_seen = []

    def zero_latents_at_the_end(pipe, i, t, kwargs):
        steps_seen.append((pipe is refiner, i))
        if pipe is refiner and i == pipe.num_timesteps - 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return kwargs

    _, final = split_run(base, refiner, test_image(), FOUR_BANDS, base_callback=zero_latents_at_the_end,
                         refiner_callback=zero_latents_at_the_end)
    assert steps_seen == [(False, i) for i in range(HANDOFF)] + [(True, i) for i in range(STEPS - HANDOFF)]
    assert torch.equal(final, torch.zeros_like(final))


def test_pipeline_callback_objects_work(components):
    (stock, _), (ours, _) = pipelines(components, cls=StableDiffusionXLImg2ImgPipeline), pipelines(components)
    cutoff = SDXLCFGCutoffCallback(cutoff_step_ratio=0.5)
    run = dict(image=test_image(), num_inference_steps=6, output_type="np", callback_on_step_end=cutoff)
    expected = stock(PROMPT, strength=1.0, generator=seeded_generator(), **run).images
    result = ours(PROMPT, map=np.zeros((64, 64), np.float32), generator=seeded_generator(), **run).images
    assert np.array_equal(result, expected)


def test_images_and_maps_may_be_pil_numpy_or_tensors(components):
    ours = pipelines(components)[0]
    image = test_image()
    pixels = np.asarray(image, dtype=np.float32) / 255
    keep_map = FOUR_BANDS
    forms = [
        (image, keep_map),
        (pixels[None], keep_map[None]),
        (torch.from_numpy(pixels).permute(2, 0, 1)[None], torch.from_numpy(keep_map)[None, None]),
    ]
    results = [
        ours(PROMPT, image=form, map=m, num_inference_steps=4, generator=seeded_generator(), output_type="np").images
        for form, m in forms
    ]
    assert np.array_equal(results[0], results[1])
    # Stock makes tensors contiguous but keeps PIL and numpy pixels channels-last; the VAE rounds the two apart.
    assert np.abs(results[0] - results[2]).max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# keep_exact


def test_keep_exact_in_the_refiner_returns_the_input_bytes_where_strength_is_zero(components):
    base, refiner = pipelines(components)
    image = test_image()
    _, exact = split_run(base, refiner, image, FOUR_BANDS, output_type="pil", keep_exact_in_refiner=True)
    kept = FOUR_BANDS == 1.0
    exact = np.asarray(exact[0])
    assert np.array_equal(exact[kept], np.asarray(image)[kept])
    assert not np.array_equal(exact[~kept], np.asarray(image)[~kept])
    _, exact_np = split_run(base, refiner, image, FOUR_BANDS, output_type="np", keep_exact_in_refiner=True)
    _, plain = split_run(base, refiner, image, FOUR_BANDS, output_type="np")
    assert np.array_equal(exact_np[0][~kept], plain[0][~kept])  # strength >= 1/T: the model's output, untouched


def test_keep_exact_with_nothing_to_change_is_the_input_itself(components):
    base = pipelines(components)[0]
    calls = count_unet_calls(base)
    image = test_image()
    result = base(PROMPT, image=image, map=np.ones((64, 64), np.float32), keep_exact=True).images[0]
    assert np.array_equal(np.asarray(result), np.asarray(image)) and calls == []


@pytest.mark.parametrize(
    "change, message",
    [(dict(output_type="latent"), "as pixels"), (dict(denoising_end=0.8), "the call that finishes it")],
)
def test_keep_exact_is_refused_where_there_is_no_finished_image(components, change, message):
    base = pipelines(components)[0]
    with pytest.raises(ValueError, match=message):
        base(PROMPT, image=test_image(), map=FOUR_BANDS, keep_exact=True, **change)


# ---------------------------------------------------------------------------------------------------------------
# Loading and bad input


def test_loading_from_a_folder_as_class_and_as_custom_pipeline(sdxl_base_dir):
    by_class = StableDiffusionXLDiffImg2ImgPipeline.from_pretrained(sdxl_base_dir)
    by_custom = DiffusionPipeline.from_pretrained(sdxl_base_dir, custom_pipeline="SDXL/diff_pipe.py",
                                                  trust_remote_code=True)
    assert type(by_custom).__name__ == "StableDiffusionXLDiffImg2ImgPipeline"
    stock = StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_base_dir)
    from_pipe = StableDiffusionXLDiffImg2ImgPipeline.from_pipe(stock)
    run = dict(image=test_image(), map=FOUR_BANDS, num_inference_steps=4, output_type="np")
    results = []
    for pipe in (by_class, by_custom, from_pipe):
        pipe.set_progress_bar_config(disable=True)
        results.append(pipe(PROMPT, generator=seeded_generator(), **run).images)
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


LATENTS = torch.zeros(1, 4, LATENT, LATENT)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(map=[np.zeros((64, 64))] * 3), "3 maps for 1 images"),
        (dict(map=np.zeros((64, 32))), "aspect ratio"),
        (dict(map=None), "`map`"),
        (dict(strength=1.5), "strength"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(image=LATENTS, denoising_start=0.8), "`original_image`"),
        (dict(original_image=test_image()), "`original_image` is for"),
        (dict(image=LATENTS[..., :16], original_image=test_image(), denoising_start=0.8), "size the base edited"),
        (dict(denoising_start=0.8, denoising_end=0.5), "`denoising_start`"),
        (dict(latents=LATENTS[..., :16]), "`latents` must be a tensor shaped like the latents, (1, 4, 32, 32)"),
        (dict(noise=LATENTS.repeat(2, 1, 1, 1)), "`noise` must be a tensor shaped like the latents"),
    ],
)
def test_bad_arguments_are_refused_clearly(components, change, message):
    ours = pipelines(components)[0]
    run = {**dict(image=test_image(), map=np.zeros((64, 64), np.float32), num_inference_steps=4), **change}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ours(PROMPT, **run)


def test_a_split_inside_a_second_order_step_is_refused(components):
    ours = pipelines(components)[0]
    ours.scheduler = HeunDiscreteScheduler.from_config(ours.scheduler.config)
    with pytest.raises(ValueError, match="first-order scheduler"):
        ours(PROMPT, image=test_image(), map=FOUR_BANDS, num_inference_steps=4, denoising_end=0.8)


def test_maps_follow_their_images_through_num_images_per_prompt(components):
    # Stock repeats the image batch as a whole for num_images_per_prompt (a, b, a, b) while it repeats each
    # prompt in place (p0, p0, p1, p1): the maps must follow the images, in both stages and in keep_exact.
    base, refiner = pipelines(components)
    images, maps = [test_image(seed=1), test_image(seed=2)], [FOUR_BANDS, np.ascontiguousarray(FOUR_BANDS[:, ::-1])]
    prompts, seeds = ["a red apple", "a blue pear"], [3, 4, 5, 6]

    def edit(prompts, images, maps, num_images_per_prompt):
        common = dict(map=maps, num_images_per_prompt=num_images_per_prompt, num_inference_steps=STEPS)
        latents = base(prompts, image=images, denoising_end=SPLIT, output_type="latent",
                       generator=[seeded_generator(s) for s in seeds], **common).images
        final = refiner(prompts, image=latents, original_image=images, denoising_start=SPLIT, keep_exact=True,
                        output_type="np", generator=[seeded_generator(s) for s in seeds], **common).images
        return latents, final

    latents, batch = edit(prompts, images, maps, num_images_per_prompt=2)
    written_out_latents, written_out = edit([p for p in prompts for _ in range(2)], images * 2, maps * 2, 1)
    # The text encoders run two prompts against four: float32 may round them apart in the last bits.
    assert torch.abs(latents - written_out_latents).max() <= 1e-5 * latents.abs().max()
    assert np.abs(batch - written_out).max() <= 1e-5


def test_keep_exact_with_a_global_strength_below_one_blends_half_and_half(components):
    # The weight is clamp(T * strength * (1 - map), 0, 1): keep 0.9 at strength 0.5 over 10 steps gives 0.5.
    base = pipelines(components)[0]
    run = dict(image=test_image(), map=bands(0.9, 0.0), strength=0.5, num_inference_steps=STEPS, output_type="pt")
    exact = base(PROMPT, keep_exact=True, generator=seeded_generator(), **run).images
    plain = base(PROMPT, generator=seeded_generator(), **run).images
    original = base.image_processor.preprocess(test_image()) / 2 + 0.5
    assert (plain[..., :32] - original[..., :32]).abs().max() > 0.1  # the VAE round trip is far from the input
    # The map's 0.9 stands for strength 0.1: the weight is 0.5.
    assert torch.allclose(exact[..., :32], 0.5 * plain[..., :32] + 0.5 * original[..., :32], atol=1e-6)
    assert torch.equal(exact[..., 32:], plain[..., 32:])
