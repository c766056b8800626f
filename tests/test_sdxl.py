"""What is particular to SDXL's pipeline: the base/refiner split (`denoising_end`, `denoising_start`, `original_image`,
`noise`), user `latents` and its input forms; tests/test_contract.py checks the rest."""

import numpy as np
import pytest
import torch
from conftest import (
    assert_close_to_single_run, build_pipeline, count_unet_calls, make_scheduler, sdxl_components,
    sdxl_refiner_components, seeded_generator, test_image,
)
from diffusers import HeunDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
from families import band_map, plain_schedule, vae_x0_and_noise

from SDXL.diff_pipe import StableDiffusionXLDiffImg2ImgPipeline

PROMPT = "a red apple on a table"
SIZE = 32  # the test images: 16 x 16 latents on a VAE with scale factor 2 (maps are drawn at 64 px)
LATENT = SIZE // 2
STEPS = 10
SPLIT = 0.65  # stock hands over at timestep 1000 * (1 - 0.65) = 350
HANDOFF = 6  # with 10 Euler steps (timesteps 901, 801, ..., 1), the refiner starts at step 6

# Kept (never released), released at step 8 (in the refiner), at step 5 (in the base), at step 0.
FOUR_BANDS = band_map(1.0, 0.8, 0.5, 0.0)
RELEASE = [STEPS, 8, 5, 0]


@pytest.fixture(scope="module")
def components():
    base = sdxl_components()
    return base, sdxl_refiner_components(base)  # the refiner shares the base's VAE and second text encoder


def pipelines(components, scheduler="euler", cls=StableDiffusionXLDiffImg2ImgPipeline):
    """(base, refiner) of class `cls`, each with its own fresh scheduler."""
    return tuple(build_pipeline(cls, {**c, "scheduler": make_scheduler(scheduler)}) for c in components)


def band(i, count=4):
    """Latent columns of band i of `count`."""
    width = LATENT // count
    return slice(i * width, (i + 1) * width)


def x0_and_noise(pipe, image=None):
    return vae_x0_and_noise(pipe, {"image": image or test_image(SIZE)})


def noised(scheduler, x0, noise, step):
    return scheduler.add_noise(x0, noise, scheduler.timesteps[step : step + 1])


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
              refiner_callback=None, output_type="latent", keep_exact_in_refiner=False, prompt=PROMPT, **common):
    """Base then refiner, each with a generator of `seed`, one for each of a list of seeds, or none for None."""

    def generator():
        if isinstance(seed, list):
            return [seeded_generator(s) for s in seed]
        return None if seed is None else seeded_generator(seed)

    latents = base(prompt, image=image, map=keep_map, num_inference_steps=steps, denoising_end=split,
                   generator=generator(), output_type="latent", callback_on_step_end=base_callback,
                   **common).images
    final = refiner(prompt, image=latents, original_image=image, map=keep_map, num_inference_steps=steps,
                    denoising_start=split, generator=generator(), output_type=output_type,
                    callback_on_step_end=refiner_callback, keep_exact=keep_exact_in_refiner, **common).images
    return latents, final


# Base and refiner


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_uniform_map_through_base_and_refiner_is_stock_base_and_refiner(components, scheduler, strength):
    stock_base, stock_refiner = pipelines(components, scheduler, StableDiffusionXLImg2ImgPipeline)
    base, refiner = pipelines(components, scheduler)
    image = test_image(SIZE)
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


@pytest.mark.parametrize("scheduler, tied_by", [("euler", "generator"), ("dpm++", "generator"), ("euler", "noise")])
def test_frozen_pixels_follow_the_noised_original_across_the_handoff(components, scheduler, tied_by):
    # The stages are tied by one seed, or by the `noise` argument without a generator.
    base, refiner = pipelines(components, scheduler)
    if tied_by == "generator":
        image, tie = test_image(SIZE), {}
        x0, noise = x0_and_noise(base, image)
    else:  # a 4-channel image is x0 itself
        x0 = image = torch.randn(1, 4, LATENT, LATENT, generator=seeded_generator(3))
        noise = torch.randn(1, 4, LATENT, LATENT, generator=seeded_generator(4))
        tie = dict(seed=None, noise=noise)
    reference = plain_schedule(base.scheduler, STEPS)
    handoff = int((reference.timesteps >= 350).sum())  # the first step below the split's timestep
    assert 5 < handoff < 8  # between the bands released at 5 and at 8
    seen = []
    latents, final = split_run(base, refiner, image, FOUR_BANDS, base_callback=recorder(seen, 0),
                               refiner_callback=recorder(seen, handoff), **tie)

    assert [step for step, _ in seen] == list(range(1, STEPS + 1))  # every step ran once, in one stage or the other
    assert (base.num_timesteps, refiner.num_timesteps) == (handoff, STEPS - handoff)
    assert torch.equal(latents, seen[handoff - 1][1])  # the base returns the input of the refiner's first step
    for step, step_latents in seen[:-1]:
        expected = noised(reference, x0, noise, step)
        for i, release in enumerate(RELEASE):
            if step <= release:
                assert torch.equal(step_latents[..., band(i)], expected[..., band(i)]), (step, release)
            else:
                assert not torch.allclose(step_latents[..., band(i)], expected[..., band(i)], atol=1e-3)
    assert not torch.allclose(latents[..., band(0)], x0[..., band(0)], atol=1e-2)  # not x0 before the true end
    assert torch.equal(final[..., band(0)], x0[..., band(0)])
    for i in range(1, len(RELEASE)):
        assert not torch.allclose(final[..., band(i)], x0[..., band(i)], atol=1e-2)


@pytest.mark.parametrize("given_as", ["image", "latents"])
def test_pixels_released_after_the_refiner_starts_are_frozen_whatever_it_starts_from(components, given_as):
    _, refiner = pipelines(components)
    image = test_image(SIZE)
    x0, noise = x0_and_noise(refiner, image)
    start = torch.randn(1, 4, LATENT, LATENT, generator=seeded_generator(9))
    captured = capture_start_latents(refiner)
    refiner_input = {"image": start} if given_as == "image" else {"image": torch.zeros_like(start), "latents": start}
    refiner(PROMPT, original_image=image, map=FOUR_BANDS, num_inference_steps=STEPS, denoising_start=SPLIT,
            generator=seeded_generator(), output_type="latent", **refiner_input)
    (first_input,) = captured
    expected = noised(plain_schedule(refiner.scheduler, STEPS), x0, noise, HANDOFF)
    for i, release in enumerate(RELEASE):
        source = expected if release > HANDOFF else start  # released by the base: the latents handed over
        assert torch.equal(first_input[..., band(i)], source[..., band(i)])


def test_steps_that_have_nothing_to_change_never_run_in_either_stage(components):
    base, refiner = pipelines(components)
    base_calls, refiner_calls = count_unet_calls(base), count_unet_calls(refiner)
    # A map with nothing to change runs no step in either stage and returns x0.
    x0, _ = x0_and_noise(base)
    for keep_map, strength in [(np.ones((64, 64), np.float32), 1.0), (FOUR_BANDS, 0.0)]:
        _, final = split_run(base, refiner, test_image(SIZE), keep_map, strength=strength)
        assert torch.equal(final, x0)
    assert base_calls == refiner_calls == [] and base.num_timesteps == refiner.num_timesteps == 0
    # Steps before the first release never run.
    keep_map = band_map(1.0, 0.7)  # strongest pixel 0.3: released at step 7 of 10, after the handoff at 6
    image = test_image(SIZE)
    latents, final = split_run(base, refiner, image, keep_map, guidance_scale=1.0)
    # The base has no step to run: it returns the input of step 6, where every pixel is still frozen.
    assert base_calls == [] and base.num_timesteps == 0
    assert torch.equal(latents, noised(plain_schedule(base.scheduler, STEPS), *x0_and_noise(base, image), HANDOFF))
    # The refiner starts at the first release, from the original, as the refiner alone on the image would.
    assert len(refiner_calls) == refiner.num_timesteps == 3
    alone = refiner(PROMPT, image=image, map=keep_map, num_inference_steps=STEPS, guidance_scale=1.0,
                    generator=seeded_generator(), output_type="latent").images
    assert torch.equal(final, alone)
    base_calls.stop(), refiner_calls.stop()
    # A refiner with no step left ends the schedule.
    handed_over = torch.randn(1, 4, LATENT, LATENT, generator=seeded_generator(5))
    # 0.9995 puts stock's cutoff at timestep 0, after the last step
    final = refiner(PROMPT, image=handed_over, original_image=test_image(SIZE), map=FOUR_BANDS,
                    num_inference_steps=STEPS, denoising_start=0.9995, generator=seeded_generator(),
                    output_type="latent").images
    assert refiner.num_timesteps == 0
    assert torch.equal(final[..., band(0)], x0[..., band(0)])  # kept pixels become x0 at the end
    assert torch.equal(final[..., band(1).start :], handed_over[..., band(1).start :])


def test_user_step_end_callback_sees_blended_latents_in_both_stages_and_can_change_them(components):
    base, refiner = pipelines(components)
    steps_seen = []

    def zero_latents_at_the_end(pipe, i, t, kwargs):
        steps_seen.append((pipe is refiner, i))
        if pipe is refiner and i == pipe.num_timesteps - 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return kwargs

    _, final = split_run(base, refiner, test_image(SIZE), FOUR_BANDS, base_callback=zero_latents_at_the_end,
                         refiner_callback=zero_latents_at_the_end)
    assert steps_seen == [(False, i) for i in range(HANDOFF)] + [(True, i) for i in range(STEPS - HANDOFF)]
    assert torch.equal(final, torch.zeros_like(final))


def test_a_split_inside_a_second_order_step_is_refused(components):
    ours = pipelines(components)[0]
    ours.scheduler = HeunDiscreteScheduler.from_config(ours.scheduler.config)
    with pytest.raises(ValueError, match="first-order scheduler"):
        ours(PROMPT, image=test_image(SIZE), map=FOUR_BANDS, num_inference_steps=4, denoising_end=0.8)


# Batches through both stages


def test_batches_through_base_and_refiner_equal_each_run_alone_and_maps_follow_their_images(components):
    base, refiner = pipelines(components)
    images = [test_image(SIZE, seed=1), test_image(SIZE, seed=2)]
    maps = [FOUR_BANDS, np.ascontiguousarray(FOUR_BANDS[:, ::-1])]
    prompts, seeds = ["a red apple", "a blue pear"], [3, 4]
    # Two images with their own maps.
    latents, batch = split_run(base, refiner, images, maps, seed=seeds, prompt=prompts, output_type="np")
    for i in range(2):
        alone_latents, alone = split_run(base, refiner, images[i], maps[i], seed=seeds[i], prompt=prompts[i],
                                         output_type="np")
        assert_close_to_single_run(latents[i], alone_latents[0])
        assert_close_to_single_run(batch[i], alone[0])
    # Two copies of one image.
    image = test_image(SIZE)
    _, batch = split_run(base, refiner, image, FOUR_BANDS, seed=[1, 2], num_images_per_prompt=2, output_type="np")
    for item, seed in zip(batch, [1, 2]):
        _, alone = split_run(base, refiner, image, FOUR_BANDS, seed=seed, output_type="np")
        assert_close_to_single_run(item, alone[0])
    assert np.abs(batch[0] - batch[1]).max() > 1e-3
    # Stock repeats the image batch as a whole for num_images_per_prompt (a, b, a, b) while it repeats each
    # prompt in place (p0, p0, p1, p1): the maps must follow the images, in both stages and in keep_exact.
    run = dict(seed=[3, 4, 5, 6], output_type="np", keep_exact_in_refiner=True)
    latents, batch = split_run(base, refiner, images, maps, prompt=prompts, num_images_per_prompt=2, **run)
    written_out_latents, written_out = split_run(base, refiner, images * 2, maps * 2,
                                                 prompt=[p for p in prompts for _ in range(2)], **run)
    # The text encoders run two prompts against four: float32 may round them apart in the last bits.
    assert torch.abs(latents - written_out_latents).max() <= 1e-5 * latents.abs().max()
    assert np.abs(batch - written_out).max() <= 1e-5


# User latents, input forms, keep_exact in the refiner


def test_user_latents_replace_the_start_as_in_stock_and_frozen_pixels_keep_the_drawn_noise(components):
    (stock, _), (ours, _) = pipelines(components, cls=StableDiffusionXLImg2ImgPipeline), pipelines(components)
    image, start = test_image(SIZE), torch.randn(1, 4, LATENT, LATENT, generator=seeded_generator(7))
    run = dict(image=image, num_inference_steps=8, latents=start, output_type="np")
    expected = stock(PROMPT, strength=0.5, generator=seeded_generator(), **run).images
    result = ours(PROMPT, map=np.full((64, 64), 0.5, np.float32), generator=seeded_generator(), **run).images
    assert np.array_equal(result, expected)
    # Under a map of bands, the user's latents start the released pixels; frozen ones keep the drawn noise.
    x0, noise = x0_and_noise(ours, image)
    reference = plain_schedule(ours.scheduler, STEPS)
    captured, seen = capture_start_latents(ours), []
    ours(PROMPT, image=image, map=band_map(1.0, 0.5, 0.0), num_inference_steps=STEPS, latents=start,
         generator=seeded_generator(), output_type="latent", callback_on_step_end=recorder(seen, 0))
    thirds = [slice(0, 5), slice(6, 10), slice(11, 16)]  # latent columns inside each band (edges at 21 and 42 px)
    assert torch.equal(captured[0][..., thirds[2]], start[..., thirds[2]])  # released at step 0: the user's latents
    for step, latents in [(0, captured[0])] + seen[:5]:
        expected = noised(reference, x0, noise, step)
        assert torch.equal(latents[..., thirds[0]], expected[..., thirds[0]])
        assert torch.equal(latents[..., thirds[1]], expected[..., thirds[1]])


def test_images_and_maps_may_be_pil_numpy_or_tensors(components):
    ours = pipelines(components)[0]
    image = test_image(SIZE)
    pixels = np.asarray(image, dtype=np.float32) / 255
    forms = [
        (image, FOUR_BANDS),
        (pixels[None], FOUR_BANDS[None]),
        (torch.from_numpy(pixels).permute(2, 0, 1)[None], torch.from_numpy(FOUR_BANDS)[None, None]),
    ]
    results = [
        ours(PROMPT, image=form, map=m, num_inference_steps=4, generator=seeded_generator(), output_type="np").images
        for form, m in forms
    ]
    assert np.array_equal(results[0], results[1])
    # Stock makes tensors contiguous but keeps PIL and numpy pixels channels-last; the VAE rounds the two apart.
    assert np.abs(results[0] - results[2]).max() <= 1e-5


def test_keep_exact_in_the_refiner_returns_the_input_bytes_where_strength_is_zero(components):
    base, refiner = pipelines(components)
    image = test_image(SIZE)
    _, exact = split_run(base, refiner, image, FOUR_BANDS, output_type="pil", keep_exact_in_refiner=True)
    kept = FOUR_BANDS[::2, ::2] == 1.0  # on the 32 px output
    exact = np.asarray(exact[0])
    assert np.array_equal(exact[kept], np.asarray(image)[kept])
    assert not np.array_equal(exact[~kept], np.asarray(image)[~kept])
    _, exact_np = split_run(base, refiner, image, FOUR_BANDS, output_type="np", keep_exact_in_refiner=True)
    _, plain = split_run(base, refiner, image, FOUR_BANDS, output_type="np")
    assert np.array_equal(exact_np[0][~kept], plain[0][~kept])  # strength >= 1/T: the model's output, untouched
