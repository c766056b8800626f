"""The contract that every pipeline class keeps, on every family of tests/families.py, against stock's own results or
x0 and noise recomputed as stock draws them (design notes, section 2). What one family adds is in its own file."""

import copy
import inspect
import re
from contextlib import contextmanager

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import assert_close_to_single_run, build_pipeline, count_unet_calls, seeded_generator
from families import (
    FAMILIES, FLOOR, FLOW, FOUR_EDGES, MAP_SIZE, OUR_ARGUMENTS, band_columns, band_map, batched, family_context,
    steps_run
)

FOUR_STRENGTHS = (0.0, 0.3, 0.5, 1.0)  # kept; T*s not whole (1.8 at T = 6); half; released at step 0
FOUR_BANDS = band_map(*(1 - s for s in FOUR_STRENGTHS), edges=FOUR_EDGES)
WHITE = np.ones((MAP_SIZE, MAP_SIZE), np.float32)
HALVES = [0, MAP_SIZE // 2, MAP_SIZE]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(autouse=True)
def in_family_context(request):
    """Each test inside its family's own context (tests/families.py, `Family.context`)."""
    with family_context(request.node):
        yield


@pytest.fixture(scope="module")
def components(family):
    """Built once per family; tests build pipelines on them with a fresh scheduler, and take off any hook they add."""
    return FAMILIES[family].components()


def pipelines(family, components, scheduler_class=None):
    """Stock and ours on the same components, each with its own copy of the scheduler (of `scheduler_class`,
    configured as the components' scheduler, if given)."""
    entry, scheduler = FAMILIES[family], components["scheduler"]
    if scheduler_class is not None:
        scheduler = scheduler_class.from_config(scheduler.config)
    return tuple(build_pipeline(cls, {**components, "scheduler": copy.deepcopy(scheduler)})
                 for cls in (entry.stock, entry.ours))


def edit(pipe, family, item=0, seed=0, **changes):
    """`pipe`'s images for batch item `item` with `changes`, torch's global generator reseeded for the schedulers that
    draw from it (FlowMatchLCMScheduler)."""
    torch.manual_seed(0)
    return outputs(family, pipe(**{**FAMILIES[family].inputs(item), "generator": seeded_generator(seed), **changes}))


def outputs(family, output):
    """A call's images, or videos where the family makes videos (the registry's `output`)."""
    return getattr(output, FAMILIES[family].output)


def copies(family, count):
    """The arguments that ask for `count` copies of each output, and the copies that stock then makes (one where it
    makes one per prompt whatever is asked)."""
    argument = FAMILIES[family].copies_argument
    return ({}, 1) if argument is None else ({argument: count}, count)


def two_images(family):
    """Batch items 0 and 1 as the inputs of one call, afresh for every call: stock Z-Image writes its formatted
    prompts into the list it is given."""
    return batched([FAMILIES[family].inputs(0), FAMILIES[family].inputs(1)])


def latent_output(family):
    """The output type that hands back the loop's own tensor: latents, or IF's pixels in [-1, 1]."""
    return "pt" if "latent output" in FAMILIES[family].skip else "latent"


def on_grid(family, pipe, latents):
    """Latents as the loop holds them, on the latent grid (unpacked where the family packs them)."""
    unpack = FAMILIES[family].on_grid
    return latents if unpack is None else unpack(pipe, latents)


def skip_unless_it_can(family, check):
    """Skips `check` where the registry says the family cannot do it."""
    if check in FAMILIES[family].skip:
        pytest.skip(f"{family}: {FAMILIES[family].skip[check]}")


def in_stock_order(family, per_image, copies):
    """Per-image tensors repeated as stock repeats images for `copies` images per prompt."""
    if FAMILIES[family].repeats == "each":
        return per_image.repeat_interleave(copies, dim=0)
    return per_image.repeat(copies, *(1,) * (per_image.ndim - 1))


@contextmanager
def denoiser_calls(pipe, family):
    """Counts the calls of each model that runs once per step (the registry's `denoisers`) within the block."""
    counters = [count_unet_calls(model) for model in FAMILIES[family].denoisers(pipe)]
    try:
        yield counters
    finally:
        for counter in counters:
            counter.stop()


def each_made(counters, calls):
    return [len(counter) for counter in counters] == [calls] * len(counters)


# The signature is stock's, then ours


def test_signature_is_stocks_then_ours_and_every_stock_argument_reaches_stock(family, components, monkeypatch):
    entry = FAMILIES[family]
    stock = list(inspect.signature(entry.stock.__call__).parameters.values())
    ours = list(inspect.signature(entry.ours.__call__).parameters.values())
    named = [p for p in stock if p.kind is not p.VAR_KEYWORD]
    assert [p.name for p in ours[: len(named)]] == [p.name for p in named]
    for our, theirs in zip(ours, named):
        assert our.kind == theirs.kind, our.name
        # A map already says how much each pixel changes: `strength` only scales it, so it defaults to 1. Where stock
        # is what a call without a map runs and stock's default is not 1, None stands for 1 with a map and stock's
        # own default without one.
        strength = None if entry.binary_mask and theirs.default != 1.0 else 1.0
        assert our.default == (strength if our.name == "strength" else theirs.default), our.name
    extras = ours[len(named) :]
    # Last, **kwargs: stock's own where it has one (deprecated callbacks), and in every class a way to tell the crop's
    # old keywords where the crop went (tests/test_crop.py).
    var_keyword = extras.pop()
    assert var_keyword.kind is var_keyword.VAR_KEYWORD and var_keyword.name == "kwargs"
    # Ours come after all of stock's and are keyword-only, so stock's positions keep their meaning.
    assert all(p.kind is p.KEYWORD_ONLY for p in extras), [(p.name, p.kind) for p in extras]
    assert {p.name: p.default for p in extras} == {**OUR_ARGUMENTS, **entry.extra_arguments}
    assert [p.name for p in extras if p.name in OUR_ARGUMENTS] == list(OUR_ARGUMENTS)

    # Every stock argument reaches stock.
    _, ours = pipelines(family, components)
    received, stock_call = {}, entry.stock.__call__

    def spy(self, *args, **kwargs):
        assert not args  # by name, so that a shift in stock's positions cannot mix them up
        received.update(kwargs)
        return stock_call(self, **kwargs)

    monkeypatch.setattr(entry.stock, "__call__", spy)
    edit(ours, family, map=FOUR_BANDS, num_inference_steps=2, output_type=latent_output(family), **entry.passed_through)
    parameters = inspect.signature(stock_call).parameters.items()
    named = {name for name, p in parameters if name != "self" and p.kind is not p.VAR_KEYWORD}
    assert set(received) == named - entry.withheld
    assert {name: received[name] for name in entry.passed_through} == entry.passed_through


# A uniform map is stock bit for bit

UNIFORM = {  # case: (strength, T), or by release rule
    "full": (1.0, 3),
    # 10 * 0.3 is 3 (3 steps); a float32 gray map of 0.7 holds 0.69999999, which read as it is would make a flow
    # family run 4.
    "whole steps": (0.3, 10),
    "fractional": (0.5, 3),  # T*s = 1.5: stock SD runs 1 step, flow img2img 2
    # In float64, 100 * 0.29 is 28.999999999999996 (stock SD runs 28 steps, not 29), and 25 - 25 * 0.56 is
    # 10.999999999999998 (flow img2img starts at step 10 and runs 15, not 14): a map of that strength does the same.
    "just off whole steps": {FLOOR: (0.29, 100), FLOW: (0.56, 25)},
}


@pytest.mark.parametrize("case", UNIFORM)
def test_a_uniform_map_is_stock(family, components, case):
    entry = FAMILIES[family]
    strength, steps = UNIFORM[case][entry.rule] if isinstance(UNIFORM[case], dict) else UNIFORM[case]
    stock, ours = pipelines(family, components)
    k = steps_run(entry.rule, steps, strength)
    # The family's own inputs; in the fractional case, every run of the registry's calls (with and without
    # guidance, where they differ); the 28 steps just off whole steps without guidance, which plays no part in the
    # count.
    if case == "just off whole steps":
        variants = [(dict(output_type=latent_output(family), **entry.no_guidance), 1)]
    else:
        variants = [(dict(changes, output_type="np"), per_step) for changes, per_step in entry.calls.values()
                    if case == "fractional" or not changes]
    for changes, calls_per_step in variants:
        run = dict(num_inference_steps=steps, **changes)
        expected = edit(stock, family, strength=strength, **entry.stock_inputs, **run)
        # A black map at global strength s, and (below 1) a gray map 1 - s at strength 1: both are s everywhere.
        forms = [(np.zeros((MAP_SIZE, MAP_SIZE), np.uint8), strength)]
        if strength < 1 and case != "just off whole steps":
            forms.append((np.full((MAP_SIZE, MAP_SIZE), 1 - strength, np.float32), 1.0))
        for keep_map, global_strength in forms:
            with denoiser_calls(ours, family) as calls:
                result = edit(ours, family, map=keep_map, strength=global_strength, **run)
            assert (np.array_equal if run["output_type"] == "np" else torch.equal)(result, expected), changes
            assert ours.num_timesteps == k and each_made(calls, calls_per_step * k)
        assert getattr(stock, "num_timesteps", k) == k
    # The registry's other schedulers, in the full and fractional cases.
    for scheduler_class in entry.schedulers if case in ("full", "fractional") else ():
        stock, ours = pipelines(family, components, scheduler_class)
        run = dict(num_inference_steps=steps, output_type=latent_output(family))
        expected = edit(stock, family, strength=strength, **entry.stock_inputs, **run)
        result = edit(ours, family, map=np.zeros((MAP_SIZE, MAP_SIZE), np.float32), strength=strength, **run)
        assert torch.equal(result, expected), scheduler_class.__name__
        # Loop iterations: a second-order scheduler (SD3's Heun) makes two of most steps.
        assert ours.num_timesteps == getattr(stock, "num_timesteps", k), scheduler_class.__name__


@pytest.mark.parametrize("one_generator", [True, False], ids=["one generator", "a generator per image"])
def test_a_batch_under_a_uniform_map_is_stock(family, components, one_generator):
    if not one_generator:
        skip_unless_it_can(family, "a generator per image")
    entry = FAMILIES[family]
    stock, ours = pipelines(family, components)
    asked, made = copies(family, 2)
    run = dict(**asked, num_inference_steps=3, output_type=latent_output(family))
    results = []
    for pipe, changes in [(stock, dict(strength=0.5, **entry.stock_inputs)),
                          (ours, dict(map=np.full((MAP_SIZE, MAP_SIZE), 0.5, np.float32)))]:
        # A generator for each image: schedulers that draw at every step (DDPM) draw from each image's own.
        generator = seeded_generator() if one_generator else [seeded_generator(s) for s in range(2 * made)]
        torch.manual_seed(0)
        results.append(outputs(family, pipe(**two_images(family), **run, **changes, generator=generator)))
    assert results[1].shape[0] == 2 * made and torch.equal(results[1], results[0])


# Frozen pixels hold the noised original; kept pixels end as x0

FROZEN = {  # case: (strengths of the four bands, global strength, T)
    "four bands": (FOUR_STRENGTHS, 1.0, 6),
    # Strengths 0.15, 0.25, 0.35 and 0.5: the run starts at step 5, no band is ever kept, and none ends as x0.
    "nothing kept": ((0.3, 0.5, 0.7, 1.0), 0.5, 10),
}


@pytest.mark.parametrize("case", FROZEN)
def test_frozen_pixels_hold_the_noised_original_and_kept_pixels_end_as_x0(family, components, case):
    entry = FAMILIES[family]
    band_strengths, strength, steps = FROZEN[case]
    keep_map = band_map(*(1 - s for s in band_strengths), edges=FOUR_EDGES)
    release = [steps - steps_run(entry.rule, steps, strength * s) for s in band_strengths]
    for scheduler_class in [None, *entry.schedulers]:
        _, ours = pipelines(family, components, scheduler_class)
        # Where the registry says a scheduler's last step moves a pixel too little to tell from x0 (stock's own
        # schedule), pixels released for the last steps only are not told from x0; all else is checked.
        near_x0 = f"last steps of {type(ours.scheduler).__name__}" in entry.skip
        x0, noise = entry.x0_and_noise(ours, entry.inputs(0))
        reference = entry.schedule(ours.scheduler, steps)
        seen, step = [], ours.scheduler.step  # the latents of every loop iteration (on the latent grid)

        def recording_step(model_output, timestep, sample, *args, **kwargs):
            seen.append(on_grid(family, ours, sample).clone())
            return step(model_output, timestep, sample, *args, **kwargs)

        ours.scheduler.step = recording_step
        final = on_grid(family, ours, edit(ours, family, map=keep_map, strength=strength, num_inference_steps=steps,
                                             output_type=latent_output(family)))

        order, columns = reference.order, band_columns(FOUR_EDGES, x0.shape[-1])
        first = min(release) * order
        assert len(seen) == len(reference.timesteps) - first
        for iteration, latents in enumerate(seen, start=first):
            if hasattr(reference, "add_noise"):  # what stock's noising gives at this iteration: add_noise where the
                noised = reference.add_noise(x0, noise, reference.timesteps[iteration : iteration + 1])
            else:  # scheduler has one, else scale_noise's flow formula
                noised = reference.sigmas[iteration] * noise + (1 - reference.sigmas[iteration]) * x0
            for band, band_release in zip(columns, release):
                where = (scheduler_class, iteration, band_release)
                if band_release * order < iteration:  # released: the model's own latents
                    assert not torch.allclose(latents[..., band], noised[..., band], atol=1e-3), where
                elif not (entry.starts_from_noise and band_release == iteration == 0):
                    assert torch.equal(latents[..., band], noised[..., band]), where
        for band, band_release in zip(columns, release):
            if band_release == steps:
                assert torch.equal(final[..., band], x0[..., band])
            elif not near_x0:
                assert not torch.allclose(final[..., band], x0[..., band], atol=1e-2)
        # No pixel is left unreleased to be set to x0: every one ends as the model left it.
        if steps not in release and not near_x0:
            # (IF's pixels may end within 1e-2 of x0 after one weak step, but never on it.)
            margin = 0 if "latent output" in entry.skip else 1e-2
            assert (final - x0).abs().amax(dim=1).min() > margin


# Steps that run, and the map that changes nothing


@pytest.mark.parametrize("strength", [0.5, 0.35, 0.15, 0.05])  # at T = 10: 5, 3, 1, 0 SD steps; 5, 4, 2, 1 flow
def test_k_released_steps_make_k_denoiser_calls(family, components, strength):
    entry = FAMILIES[family]
    _, ours = pipelines(family, components)
    k = steps_run(entry.rule, 10, strength)
    for variant, (changes, calls_per_step) in entry.calls.items():
        with denoiser_calls(ours, family) as calls:
            edit(ours, family, map=band_map(1.0, 1 - strength), num_inference_steps=10,
                 output_type=latent_output(family), **changes)
        assert each_made(calls, calls_per_step * k) and ours.num_timesteps == k, variant


def test_a_white_map_runs_no_step_and_returns_the_original(family, components):
    entry = FAMILIES[family]
    _, ours = pipelines(family, components)
    output_type = latent_output(family)
    x0, _ = entry.x0_and_noise(ours, entry.inputs(0))
    with denoiser_calls(ours, family) as calls:
        for keep_map, strength in [(WHITE, 1.0), (FOUR_BANDS, 0.0)]:
            result = edit(ours, family, map=keep_map, strength=strength, output_type=output_type)
            assert torch.equal(on_grid(family, ours, result), x0) and ours.num_timesteps == 0
        images = edit(ours, family, map=WHITE, output_type="np")
        assert np.array_equal(images, entry.decode(ours, x0).movedim(1, -1).numpy())  # channels last
        # A batch: one x0 for each output image, in stock's order.
        asked, made = copies(family, 2)
        result = outputs(family, ours(**two_images(family), map=WHITE, **asked, generator=seeded_generator(),
                                      output_type=output_type))
        x0 = in_stock_order(family, entry.x0_and_noise(ours, two_images(family))[0], made)
        assert torch.equal(on_grid(family, ours, result), x0) and ours.num_timesteps == 0
        # keep_exact with nothing to change: the input itself.
        result = edit(ours, family, map=WHITE, keep_exact=True, output_type="pil")[0]
        assert np.array_equal(np.asarray(result), np.asarray(entry.inputs(0)[entry.edited]))
    assert each_made(calls, 0)


# Batches


def test_images_with_their_own_maps_in_one_batch_are_each_run_alone(family, components):
    entry = FAMILIES[family]
    _, ours = pipelines(family, components)
    maps, seeds = [FOUR_BANDS, np.ascontiguousarray(FOUR_BANDS[:, ::-1])], [3, 4]
    run = dict(num_inference_steps=4, output_type=latent_output(family), **entry.batch_inputs)
    torch.manual_seed(0)
    batch = outputs(family, ours(**two_images(family), map=entry.maps(maps),
                                 generator=[seeded_generator(s) for s in seeds], **run))
    batch = on_grid(family, ours, batch)
    for i in range(2):
        alone = on_grid(family, ours, edit(ours, family, item=i, seed=seeds[i], map=maps[i], **run))
        assert_close_to_single_run(batch[i : i + 1], alone)
    assert not torch.allclose(batch[0], batch[1], atol=1e-2)
    # One map for the batch is that map for each image.
    generators = lambda: [seeded_generator(5), seeded_generator(6)]  # noqa: E731
    shared = outputs(family, ours(**two_images(family), **run, map=FOUR_BANDS, generator=generators()))
    each = ours(**two_images(family), **run, map=entry.maps([FOUR_BANDS] * 2), generator=generators())
    assert torch.equal(outputs(family, each), shared)


def test_copies_of_an_image_are_each_run_alone(family, components):
    skip_unless_it_can(family, "copies alone")
    entry = FAMILIES[family]
    _, ours = pipelines(family, components)
    changes = dict(map=FOUR_BANDS, num_inference_steps=4, output_type=latent_output(family), **entry.batch_inputs)
    if entry.image_as_latents is not None:  # stock encodes the image once, with the first generator only
        changes["image"] = entry.image_as_latents(entry.x0_and_noise(ours, entry.inputs(0))[0])
    torch.manual_seed(0)
    batch = outputs(family, ours(**{**entry.inputs(0), **changes}, num_images_per_prompt=2,
                                 generator=[seeded_generator(1), seeded_generator(2)]))
    batch = on_grid(family, ours, batch)
    for item, seed in zip(batch, [1, 2]):
        assert_close_to_single_run(item[None], on_grid(family, ours, edit(ours, family, seed=seed, **changes)))
    assert not torch.allclose(batch[0], batch[1], atol=1e-2)


def test_maps_follow_their_images(family, components):
    # Stock repeats the image batch for num_images_per_prompt as a whole (a, b, a, b) or image by image (a, a, b, b),
    # and prompts item by item: each output must keep its own image's map, whatever the order.
    entry = FAMILIES[family]
    _, ours = pipelines(family, components)
    inputs, (asked, made) = two_images(family), copies(family, 2)
    run = dict(map=entry.maps([band_map(1.0, 0.0), band_map(0.0, 1.0)]), **asked, num_inference_steps=2)
    latents = outputs(family, ours(**inputs, **run, generator=seeded_generator(), output_type=latent_output(family)))
    latents = on_grid(family, ours, latents)
    x0 = in_stock_order(family, entry.x0_and_noise(ours, two_images(family))[0], made)
    image_of = in_stock_order(family, torch.arange(2), made).tolist()  # the input image of each output
    halves = band_columns(HALVES, x0.shape[-1])
    for k, item in enumerate(latents):
        kept, changed = halves if image_of[k] == 0 else halves[::-1]
        assert torch.equal(item[..., kept], x0[k][..., kept]), k
        assert not torch.allclose(item[..., changed], x0[k][..., changed], atol=1e-2), k
    # keep_exact composites each output with its own input.
    images = outputs(family, ours(**two_images(family), **run, generator=seeded_generator(), keep_exact=True,
                                  output_type="pil"))
    for k, (image, i) in enumerate(zip(images, image_of)):  # (H, W, 3), or (F, H, W, 3) for a video
        image, edited = np.asarray(image), np.asarray(inputs[entry.edited][i])
        kept = band_columns(HALVES, image.shape[-2])[i]
        assert np.array_equal(image[..., kept, :], edited[..., kept, :]), k


# Map polarity, callbacks and bad inputs


def test_invert_map_is_the_exact_mirror(family, components):
    _, ours = pipelines(family, components)
    run = dict(num_inference_steps=4, output_type=latent_output(family))
    plain = edit(ours, family, map=FOUR_BANDS, **run)
    assert torch.equal(edit(ours, family, map=1 - FOUR_BANDS, invert_map=True, **run), plain)
    assert not torch.allclose(edit(ours, family, map=FOUR_BANDS, invert_map=True, **run), plain, atol=1e-3)


def test_a_step_end_callback_sees_every_step_and_can_change_the_latents(family, components):
    skip_unless_it_can(family, "step-end callback")
    _, ours = pipelines(family, components)
    steps_seen = []

    def zero_latents_at_the_end(pipe, i, t, kwargs):
        steps_seen.append(i)
        if i == pipe.num_timesteps - 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return kwargs

    result = edit(ours, family, map=FOUR_BANDS, num_inference_steps=4, output_type="latent",
                  callback_on_step_end=zero_latents_at_the_end)
    assert steps_seen == list(range(4)) and torch.equal(result, torch.zeros_like(result))


REFUSALS = [  # (changes, message): what every family refuses, before it runs a step
    (dict(map=None), "`map`"),
    (dict(map=[np.zeros((MAP_SIZE, MAP_SIZE))] * 3), "3 maps for 1 images"),  # one per item, as `Family.maps` says
    (dict(map=np.zeros((MAP_SIZE, MAP_SIZE // 2))), "aspect ratio"),
    (dict(map=np.full((MAP_SIZE, MAP_SIZE), 2.0)), r"\[0, 1\]"),
    (dict(strength=1.5), "strength"),
    (dict(num_inference_steps=0), "num_inference_steps"),
]


def test_bad_inputs_are_refused_clearly(family, components):
    entry = FAMILIES[family]
    _, ours = pipelines(family, components)
    # Without a map, a pipeline whose binary mask the map replaces is stock (below).
    refusals = [*REFUSALS[1 if entry.binary_mask else 0 :], *entry.refusals]
    if "latent output" not in entry.skip:  # keep_exact needs the decoded pixels
        refusals.append((dict(keep_exact=True, output_type="latent"), "keep_exact"))
    with denoiser_calls(ours, family) as calls:
        for changes, message, *error in refusals:
            if isinstance(changes.get("map"), list):
                changes = dict(changes, map=entry.maps(changes["map"]))
            with pytest.raises(*error or [ValueError], match=message):
                edit(ours, family, **{"map": np.zeros((MAP_SIZE, MAP_SIZE), np.float32), "num_inference_steps": 4,
                                      **changes})
    assert each_made(calls, 0)


def test_a_map_of_the_images_own_size_is_taken_whatever_the_rounding(family, components):
    """A side just short of a whole unit loses almost a unit to rounding, which on the short side of a tall image
    moves the aspect ratio by several units of the long one: a map of the image's own size must still pass."""
    skip_unless_it_can(family, "any size")
    entry, (_, ours) = FAMILIES[family], pipelines(family, components)
    width, height = 2 * ours.crop_unit - 1, 11 * ours.crop_unit + 1
    inputs = entry.inputs(0)
    sized = {key: inputs[key].resize((width, height)) for key in (entry.edited, "control_image") if key in inputs}
    sized.update({"height": height, "width": width} if "height" in inputs else {})
    try:
        edit(ours, family, **sized, map=np.zeros((height, width), np.float32), strength=0.5, num_inference_steps=2)
    except ValueError as error:  # stock's own refusal of a size off its grid, where it does not round
        assert "`map`" not in str(error) and re.search("divisible|multiples", str(error)), error


# keep_exact


def test_keep_exact_keeps_the_input_bytes_where_strength_is_zero_and_the_model_output_elsewhere(family, components):
    entry = FAMILIES[family]
    _, ours = pipelines(family, components)
    edited = np.asarray(entry.inputs(0)[entry.edited])  # (H, W, 3), or (F, H, W, 3) for a video
    run = dict(map=FOUR_BANDS, num_inference_steps=4)  # every band but the kept one has T * s >= 1
    exact = np.asarray(edit(ours, family, keep_exact=True, output_type="pil", **run)[0])
    kept, *released = band_columns(FOUR_EDGES, exact.shape[-2])
    released = slice(released[0].start, None)
    assert np.array_equal(exact[..., kept, :], edited[..., kept, :])
    assert not np.array_equal(exact[..., released, :], edited[..., released, :])
    plain = edit(ours, family, output_type="np", **run)
    exact = edit(ours, family, output_type="np", keep_exact=True, **run)
    assert np.array_equal(exact[..., released, :], plain[..., released, :])


@pytest.mark.parametrize("keep, strength", [(0.9, 1.0), (0.8, 0.5)])  # both s = 0.1 on the left: T * s = 0.5
def test_keep_exact_blends_strengths_below_one_step_linearly(family, components, keep, strength):
    skip_unless_it_can(family, "keep_exact blend")
    entry = FAMILIES[family]
    _, ours = pipelines(family, components)
    run = dict(map=band_map(keep, 0.0), strength=strength, num_inference_steps=5, output_type="pt")
    exact = edit(ours, family, keep_exact=True, **run)
    plain = edit(ours, family, **run)
    original = entry.unit_pixels(ours, entry.inputs(0))
    left, right = band_columns(HALVES, exact.shape[-1])
    assert (plain[..., left] - original[..., left]).abs().max() > 0.1  # the round trip is far from the input
    # The weight is clamp(T * s, 0, 1) = 0.5, to float32 rounding.
    assert torch.allclose(exact[..., left], 0.5 * plain[..., left] + 0.5 * original[..., left], atol=1e-6)
    assert torch.equal(exact[..., right], plain[..., right])



# Inpainting pipelines whose binary mask the map replaces (design, section 8)


@pytest.mark.parametrize("family", [name for name, entry in FAMILIES.items() if entry.binary_mask], scope="module")
def test_a_binary_map_is_stock_with_its_complement_as_the_mask_and_no_map_is_stock(family, components):
    """Aligned to the 2x2 patches of latents, a binary map (1 = keep) is stock with `mask_image = 1 - map`: kept
    pixels held on the noised original and ending as x0, the others free, at every strength and guidance."""
    skip_unless_it_can(family, "binary map is stock")
    entry = FAMILIES[family]
    stock, ours = pipelines(family, components)
    keep_map = band_map(1.0, 0.0)  # halves of the image: whole patches on every grid
    mask = PIL.Image.fromarray(((1 - keep_map) * 255).astype(np.uint8))
    for strength, steps in [(1.0, 3), (0.5, 3)]:  # from pure noise; T * s not whole
        for variant, (changes, calls_per_step) in entry.calls.items():
            run = dict(strength=strength, num_inference_steps=steps, output_type=latent_output(family), **changes)
            expected = edit(stock, family, mask_image=mask, **run)
            with denoiser_calls(ours, family) as calls:
                assert torch.equal(edit(ours, family, map=keep_map, **run), expected), (strength, variant)
            assert each_made(calls, calls_per_step * steps_run(FLOW, steps, strength))
            assert torch.equal(edit(ours, family, mask_image=mask, **run), expected), (strength, variant)
    with pytest.raises(ValueError, match="act on a `map`"):
        edit(ours, family, mask_image=mask, keep_exact=True)
