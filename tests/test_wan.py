"""What Wan video-to-video adds to the contract of tests/test_contract.py (which runs its still maps): maps per frame,
averaged over the frames of a latent frame as Wan's VAE groups them (frame 0 alone, then 4 at a time), keep_exact
frame by frame, batches of videos, and where UniPC's history keeps a batch item from equalling its run alone."""

import numpy as np
import pytest
import torch
from conftest import assert_close_to_single_run, build_pipeline, seeded_generator, test_image
from diffusers import FlowMatchEulerDiscreteScheduler

from tests.video_models import wan_components
from tools.crop import edit_on_crop
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


# The crop (tools.crop) on video: the box holds every pixel released in any frame, and is pasted into every frame.
CROP_SIZE, CROP_FRAMES = 64, 5  # 16 x 16 latents of 4 px (the VAE without a level), in 2 latent frames


@pytest.fixture(scope="module")
def cropping_pipe():
    return build_pipeline(WanDiffVideoToVideoPipeline, wan_components(spatial_factor=4))


def crop_video():
    return [test_image(CROP_SIZE, seed=frame) for frame in range(CROP_FRAMES)]


def moving_change():
    """Keep maps per frame: frame 0 changes the block at rows 16-23, columns 16-23; frame 3 (of latent frame 1) the
    block at rows 32-39, columns 24-31, which its latent frame's mean gives strength 1/4: one of 4 steps."""
    keeps = np.ones((CROP_FRAMES, CROP_SIZE, CROP_SIZE), np.float32)
    keeps[0, 16:24, 16:24] = keeps[3, 32:40, 24:32] = 0
    return keeps


def crop_call(pipe, **changes):
    run = dict(video=crop_video(), map=moving_change(), prompt="a red apple", height=CROP_SIZE, width=CROP_SIZE,
               max_sequence_length=16, num_inference_steps=4, output_type="np", generator=seeded_generator(0))
    return {**run, **changes}


def working_video():
    """The frames as the pipeline edits them: (F, H, W, 3) in [0, 1]."""
    return np.stack([np.asarray(frame, np.float32) / 255 for frame in crop_video()])


def test_the_crop_of_a_video_is_the_union_of_every_frames_release_edited_as_a_user_would_crop_it(cropping_pipe):
    videos, box = edit_on_crop(cropping_pipe, 0, **crop_call(cropping_pipe))
    # Released cells: rows 4-5 and 8-9, columns 4-7 (4 px cells); 6 rows grow evenly to 8, the unit of 4 cells.
    assert box == (12, 16, 44, 32)
    top, left, bottom, right = box
    outside = np.ones((CROP_SIZE, CROP_SIZE), bool)
    outside[top:bottom, left:right] = False
    assert videos.shape == (1, CROP_FRAMES, CROP_SIZE, CROP_SIZE, 3)
    np.testing.assert_allclose(videos[0][:, outside], working_video()[:, outside], atol=1e-6)
    frames = torch.from_numpy(working_video()).permute(0, 3, 1, 2)[None, :, :, top:bottom, left:right]
    by_hand = cropping_pipe(**crop_call(cropping_pipe, video=frames, map=moving_change()[:, top:bottom, left:right],
                                        height=bottom - top, width=right - left)).frames
    np.testing.assert_allclose(videos[:, :, top:bottom, left:right], by_hand, atol=1e-6)
    assert not np.allclose(by_hand[0], working_video()[:, top:bottom, left:right], atol=1e-2)


def test_the_crop_of_a_video_that_releases_nothing_is_the_input_without_a_step(cropping_pipe):
    keep = np.ones((CROP_FRAMES, CROP_SIZE, CROP_SIZE), np.float32)
    keep[4, :8, :8] = 0.8  # its latent frame's mean strength is 0.05, below the 1/4 that one of 4 steps needs
    videos, box = edit_on_crop(cropping_pipe, 8, **crop_call(cropping_pipe, map=keep, output_type="pil"))
    assert box is None and cropping_pipe.num_timesteps == 0
    # keep_exact's composite: the frames of strength 0 are the input's own, and frame 4's block fades as T s = 0.8.
    unchanged = cropping_pipe(**crop_call(cropping_pipe, map=keep, output_type="pil", keep_exact=True)).frames
    assert all(np.array_equal(edited, alone) for edited, alone in zip(videos[0], unchanged[0], strict=True))
    assert all(np.array_equal(edited, source) for edited, source in zip(videos[0][:4], crop_video()[:4], strict=True))


def test_crop_upscale_edits_a_video_crop_at_the_native_size_and_keep_exact_keeps_each_frames_kept_pixels(
        cropping_pipe, monkeypatch):
    monkeypatch.setattr(cropping_pipe, "native_size", 48)  # a 32 x 16 crop is edited at 64 x 32, in units of 16
    sizes = []
    hook = cropping_pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(tuple(kwargs["hidden_states"].shape[-2:])), with_kwargs=True)
    try:
        videos, box = edit_on_crop(cropping_pipe, 0, True, **crop_call(cropping_pipe, keep_exact=True,
                                                                        output_type="pil"))
    finally:
        hook.remove()
    assert box == (12, 16, 44, 32) and set(sizes) == {(16, 8)}  # latents of 4 px: 64 x 32 px
    kept, changed = moving_change() == 1, 0
    for frame, (edited, source) in enumerate(zip(videos[0], crop_video(), strict=True)):  # each frame by its own map
        edited, source = np.asarray(edited), np.asarray(source)
        np.testing.assert_array_equal(edited[kept[frame]], source[kept[frame]])
        changed += int((edited != source).any())
    assert changed == 2  # frames 0 and 3
