"""What Wan video-to-video adds to the contract of tests/test_contract.py (which runs its still maps): maps per frame,
averaged over the frames of a latent frame as Wan's VAE groups them (frame 0 alone, then 4 at a time), keep_exact
frame by frame, batches of videos, and where UniPC's history keeps a batch item from equalling its run alone."""

import numpy as np
import pytest
import torch
from conftest import assert_close_to_single_run, build_pipeline, seeded_generator, test_image
from diffusers import FlowMatchEulerDiscreteScheduler

from tests.video_models import wan_components
from Wan.diff_pipe import WanDiffVideoToVideoPipeline, map_on_latent_frames, video_map_to_tensor

SIZE, FRAMES = 16, 9  # diffusers' test VAE (8x in space, 4x in time): 3 latent frames of 2 x 2 latents
LATENT_FRAMES = [[0], [1, 2, 3, 4], [5, 6, 7, 8]]  # the frames of each latent frame


@pytest.fixture(scope="module")
def components():
    return wan_components()


def video(seed=0):
    return [test_image(SIZE, seed=100 * seed + frame) for frame in range(FRAMES)]


def edit(pipe, seed=0, generator_seed=0, **changes):
    run = dict(video=video(seed), prompt="a red apple", height=SIZE, width=SIZE, max_sequence_length=16,
               num_inference_steps=4, output_type="latent", generator=seeded_generator(generator_seed))
    return pipe(**{**run, **changes}).frames


def frame_maps(*keeps):
    """A keep map per frame, each uniform."""
    return np.stack([np.full((SIZE, SIZE), keep, np.float32) for keep in keeps])


def test_frames_that_share_a_latent_frame_are_averaged_and_a_kept_latent_frame_ends_as_x0(components):
    ours = build_pipeline(WanDiffVideoToVideoPipeline, components)
    # Latent frame 0 kept; latent frame 1's frames average to 0.5 (exactly, in binary fractions); latent frame 2 at 0.
    per_frame = frame_maps(1, 0.25, 0.75, 0.5, 0.5, 0, 0, 0, 0)
    averaged = frame_maps(1, *[0.5] * 4, *[0] * 4)
    result = edit(ours, map=per_frame)
    assert torch.equal(result, edit(ours, map=averaged))
    x0 = edit(ours, map=np.ones((SIZE, SIZE), np.float32))  # no step runs: x0 itself
    assert torch.equal(result[:, :, 0], x0[:, :, 0])
    assert not torch.allclose(result[:, :, 1:], x0[:, :, 1:], atol=1e-2)
    # The grid: one value per latent frame, its frames' mean; equal frames keep their value exactly.
    change = video_map_to_tensor([np.full((SIZE, SIZE), 0.1, np.float32)] * 4 + [np.zeros((SIZE, SIZE))] * 5, True)
    grid = map_on_latent_frames(change, (3, 2, 2), 4, aspect_of=(SIZE, SIZE))
    assert grid.shape == (1, 1, 3, 2, 2)
    assert grid[0, 0, :, 0, 0].tolist() == [0.9, (3 * 0.9 + 1) / 4, 1.0]


def test_a_still_map_is_that_map_on_every_frame_in_every_form(components):
    ours = build_pipeline(WanDiffVideoToVideoPipeline, components)
    keep_map = np.zeros((SIZE, SIZE), np.float32)
    keep_map[:, : SIZE // 2] = 1.0
    still = edit(ours, map=keep_map)
    for form in ([keep_map] * FRAMES, np.stack([keep_map] * FRAMES), torch.from_numpy(keep_map)[None, None]):
        assert torch.equal(edit(ours, map=form), still)


def test_keep_exact_works_frame_by_frame(components):
    ours = build_pipeline(WanDiffVideoToVideoPipeline, components)
    keeps = [1, 0, 0, 0, 0, 1, 1, 1, 1]  # latent frame 1 released, 2 kept; frame 0 kept
    frames = edit(ours, map=frame_maps(*keeps), keep_exact=True, output_type="pil")[0]
    for frame, (image, keep) in enumerate(zip(frames, keeps)):
        assert np.array_equal(np.asarray(image), np.asarray(video()[frame])) == bool(keep), frame
    # Nothing to change: the input itself, without a step.
    frames = edit(ours, map=np.ones((SIZE, SIZE), np.float32), keep_exact=True, output_type="pil")[0]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, video()))
    assert ours.num_timesteps == 0


def test_each_video_of_a_batch_takes_its_own_map_per_frame_or_still(components):
    ours = build_pipeline(WanDiffVideoToVideoPipeline, components)
    # Both strongest at strength 1, so that both start on step 0 (the test below shows why that matters with UniPC).
    per_frame, still = frame_maps(1, *[0.5] * 4, *[0] * 4), np.zeros((SIZE, SIZE), np.float32)
    batch = dict(video=[video(0), video(1)], prompt=["a red apple", "a blue pear"])
    generators = lambda: [seeded_generator(3), seeded_generator(4)]  # noqa: E731
    result = edit(ours, **batch, map=[list(per_frame), [still]], generator=generators())
    as_array = np.stack([per_frame, np.broadcast_to(still, per_frame.shape)])  # (B, F, H, W)
    assert torch.equal(edit(ours, **batch, map=as_array, generator=generators()), result)
    for item, (keep_map, prompt) in enumerate([(per_frame, "a red apple"), (still, "a blue pear")]):
        alone = edit(ours, seed=item, generator_seed=3 + item, prompt=prompt, map=keep_map)
        assert_close_to_single_run(result[item : item + 1], alone)
    with pytest.raises(ValueError, match="3 maps for 2 images"):
        edit(ours, **batch, map=[[still]] * 3, generator=generators())


@pytest.mark.parametrize("scheduler", ["flow Euler", "UniPC"])
def test_a_batch_item_whose_strongest_pixel_is_weaker_equals_its_run_alone_where_the_scheduler_has_no_history(
        components, scheduler):
    """The batch starts at the strongest item's first step. Flow-matching Euler's step reads the current latents
    alone, so the weaker item, held on its noised original until its own first step, runs it as alone. UniPC is
    multistep: at that step it reuses the model outputs of the steps before, which the item alone never ran."""
    if scheduler == "flow Euler":
        components = {**components, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}
    ours = build_pipeline(WanDiffVideoToVideoPipeline, components)
    maps = [np.zeros((SIZE, SIZE), np.float32), np.full((SIZE, SIZE), 0.5, np.float32)]  # first steps 0 and 2
    batch = edit(ours, video=[video(0), video(1)], prompt=["a red apple", "a blue pear"], map=[[m] for m in maps],
                 generator=[seeded_generator(3), seeded_generator(4)])
    alone = edit(ours, seed=1, generator_seed=4, prompt="a blue pear", map=maps[1])
    if scheduler == "flow Euler":
        assert_close_to_single_run(batch[1:], alone)
    else:
        assert not torch.allclose(batch[1:], alone, atol=1e-3)
