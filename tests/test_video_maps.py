"""tools.maps' video makers: `fade` and `mask-video` write a folder of maps, one per frame, that Wan/run.py --map
reads back with the video's frame count; refusals are one line and leave no folder, whole or half."""

from types import SimpleNamespace

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from tools import cli, maps
from tools.maps import fade_maps, feathered_mask, mask_video_maps, save_map_frames
from Wan import run as wan_run

STILL = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)  # binary fractions: every fade value below is exact


def frame_files(folder):
    return sorted(path.name for path in folder.iterdir())


def read_back(folder, count):
    """The folder as Wan/run.py reads `--map FOLDER` for a video of `count` frames of the maps' size."""
    width, height = Image.open(next(folder.iterdir())).size
    args = SimpleNamespace(mask=None, map=folder, frames=count, width=width, height=height)
    return wan_run.load_maps(args, [Image.new("RGB", (width, height))] * count)


# ----------------------------------------------------------------------------------------------------------------------
# fade
# ----------------------------------------------------------------------------------------------------------------------


def test_fade_keeps_everything_up_to_first_is_the_map_from_last_and_half_strength_midway():
    faded = fade_maps(STILL, frames=11, fade=(2, 8))
    assert faded.shape == (11, 2, 2) and faded.dtype == np.float32
    for frame in (0, 1, 2):
        assert np.array_equal(faded[frame], np.ones((2, 2), np.float32)), frame
    for frame in (8, 9, 10):
        assert np.array_equal(faded[frame], STILL), frame
    assert np.array_equal(faded[5], [[0.5, 0.625], [0.75, 1.0]])  # half of each strength 1, 0.75, 0.5, 0
    weights = [0, 0, 0, *(np.arange(1, 6) / 6), 1, 1, 1]  # (k - 2) / 6 between
    expected = [(1 - w * (1 - STILL.astype(np.float64))).astype(np.float32) for w in weights]
    assert np.array_equal(faded, np.stack(expected))


def test_fade_of_one_frame_is_a_cut_and_ranges_may_touch_both_ends():
    cut = fade_maps(STILL, frames=4, fade=(2, 2))
    assert all(np.array_equal(cut[k], np.ones((2, 2))) for k in (0, 1))
    assert all(np.array_equal(cut[k], STILL) for k in (2, 3))
    whole = fade_maps(STILL, frames=3, fade=(0, 2))
    assert np.array_equal(whole[0], np.ones((2, 2))) and np.array_equal(whole[2], STILL)


@pytest.mark.parametrize("frames, fade, message", [
    (5, (3, 1), "FIRST <= LAST"),
    (5, (-1, 2), "FIRST <= LAST"),
    (5, (1, 5), "ends past the last frame: 5 frames are frames 0 to 4"),
    (0, (0, 0), "`frames` must be a whole number >= 1"),
])
def test_fade_refuses_ranges_it_cannot_draw(frames, fade, message):
    with pytest.raises(ValueError, match=message):
        fade_maps(STILL, frames=frames, fade=fade)


# ----------------------------------------------------------------------------------------------------------------------
# mask-video
# ----------------------------------------------------------------------------------------------------------------------


def mask_frames(count=5, size=(20, 12)):
    """White squares that move one pixel a frame, on black: the region to fill."""
    frames = []
    for k in range(count):
        mask = np.zeros(size[::-1], np.uint8)
        mask[3:8, 2 + k: 7 + k] = 255
        frames.append(Image.fromarray(mask))
    return frames


def test_mask_video_frame_k_is_the_still_feather_of_mask_frame_k():
    masks = mask_frames()
    keep_maps = mask_video_maps(masks, feather_px=4, grow_px=1)
    assert keep_maps.shape == (5, 12, 20) and keep_maps.dtype == np.float32
    for k, mask in enumerate(masks):
        assert np.array_equal(keep_maps[k], feathered_mask(mask, feather_px=4, grow_px=1)), k
    assert not np.array_equal(keep_maps[0], keep_maps[1])


def test_mask_video_refuses_frames_of_different_sizes():
    with pytest.raises(ValueError, match="frame 1 is 8x8 pixels, frame 0 is 20x12"):
        mask_video_maps([mask_frames(1)[0], Image.new("L", (8, 8))], feather_px=2)


# ----------------------------------------------------------------------------------------------------------------------
# The folder: what Wan/run.py reads, written whole or not at all
# ----------------------------------------------------------------------------------------------------------------------


def test_cli_fade_writes_a_folder_that_wan_reads_back_frame_for_frame(tmp_path):
    Image.fromarray(np.rint(STILL * 255).astype(np.uint8)).save(tmp_path / "still.png")
    output = tmp_path / "fade"
    maps.run(["fade", "--map", str(tmp_path / "still.png"), "--frames", "9", "--fade", "2:6", "--output", str(output),
              "--bits", "16"])
    assert frame_files(output) == [f"frame_{k:04d}.png" for k in range(9)]
    read = read_back(output, 9)
    assert len(read) == 9
    still = cli.map_values(Image.open(tmp_path / "still.png"))
    expected = fade_maps(still, 9, (2, 6)).astype(np.float64)  # as save_map scales it
    for k, image in enumerate(read):
        assert np.array_equal(np.asarray(image), np.rint(expected[k] * 65535.0).astype(np.uint16)), k
    with pytest.raises(cli.CliError, match="has 9 frames but the video has 13"):
        read_back(output, 13)


def test_cli_mask_video_from_a_video_file_and_a_folder_writes_the_feather_of_each_frame(tmp_path):
    masks = mask_frames()
    imageio.mimsave(tmp_path / "mask.gif", [np.asarray(mask) for mask in masks])  # lossless, as a folder is
    (tmp_path / "frames").mkdir()
    for k, mask in enumerate(masks):
        mask.save(tmp_path / "frames" / f"m{k:02d}.png")
    for source, frames in [(tmp_path / "mask.gif", []), (tmp_path / "frames", ["--frames", "4"])]:
        output = tmp_path / f"soft-{source.stem}"
        maps.run(["mask-video", "--mask", str(source), "--feather-px", "3", "--grow-px", "1", *frames, "--output",
                  str(output)])
        count = 4 if frames else 5
        read = read_back(output, count)
        assert len(read) == count == len(frame_files(output)), source
        for k, image in enumerate(read):
            expected = feathered_mask(masks[k], feather_px=3, grow_px=1)
            assert np.array_equal(np.asarray(image), np.rint(expected * 255).astype(np.uint8)), (source, k)


BAD_COMMANDS = {  # every one refused in one line, exit status 2, nothing written
    "a range backwards": (["fade", "--map", "still.png", "--frames", "9", "--fade", "6:2", "--output", "out"],
                          "--fade: must be FIRST:LAST, two frame numbers from 0 with FIRST <= LAST"),
    "a range that is no range": (["fade", "--map", "still.png", "--frames", "9", "--fade", "6", "--output", "out"],
                                 "--fade: must be FIRST:LAST"),
    "a range past the frames": (["fade", "--map", "still.png", "--frames", "9", "--fade", "2:9", "--output", "out"],
                                "--fade 2:9 ends past the last frame: 9 frames are frames 0 to 8"),
    "no frame count": (["fade", "--map", "still.png", "--fade", "2:6", "--output", "out"], "--frames"),
    "a folder with files": (["fade", "--map", "still.png", "--frames", "9", "--fade", "2:6", "--output", "taken"],
                            "--output taken: exists and is not an empty folder; give a new folder"),
    "a file": (["fade", "--map", "still.png", "--frames", "9", "--fade", "2:6", "--output", "still.png"],
               "--output still.png: exists and is not an empty folder"),
    "no parent folder": (["fade", "--map", "still.png", "--frames", "9", "--fade", "2:6", "--output", "no/out"],
                         "--output no/out: its parent folder does not exist"),
    "an unreadable video": (["mask-video", "--mask", "bad.mp4", "--feather-px", "2", "--output", "out"],
                            "--mask bad.mp4: cannot read it as a video"),
    "a missing video": (["mask-video", "--mask", "nope.mp4", "--feather-px", "2", "--output", "out"],
                        "--mask nope.mp4: no such file"),
    "too few frames": (["mask-video", "--mask", "taken", "--feather-px", "2", "--frames", "3", "--output", "out"],
                       "--mask taken has 2 frames, fewer than --frames 3"),
    "frames of two sizes": (["mask-video", "--mask", "taken", "--feather-px", "2", "--output", "out"],
                            "--mask frame 1 is 8x8 pixels, frame 0 is 4x4"),
}


@pytest.mark.parametrize("argv, message", BAD_COMMANDS.values(), ids=BAD_COMMANDS.keys())
def test_cli_refusals_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    Image.new("L", (4, 4), 128).save("still.png")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    (tmp_path / "taken").mkdir()
    Image.new("L", (4, 4)).save("taken/a.png")
    Image.new("L", (8, 8)).save("taken/b.png")
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        maps.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert message in err and "`" not in err and "ffmpeg" not in err, err
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == before


def test_an_interrupted_write_leaves_no_folder_and_an_empty_folder_is_filled(tmp_path, monkeypatch):
    written = []
    real_save_map = maps.save_map

    def save_then_stop(keep_map, path, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        return real_save_map(keep_map, path, **kwargs)

    monkeypatch.setattr(maps, "save_map", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        save_map_frames(fade_maps(STILL, 5, (1, 3)), tmp_path / "out")
    assert len(written) == 2 and list(tmp_path.iterdir()) == []  # neither the folder nor its hidden draft
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()
    assert save_map_frames(fade_maps(STILL, 5, (1, 3)), tmp_path / "empty") == tmp_path / "empty"
    assert len(frame_files(tmp_path / "empty")) == 5 and len(list(tmp_path.iterdir())) == 1


def test_a_folder_filled_meanwhile_is_kept(tmp_path, monkeypatch):
    real_save_map = maps.save_map

    def save_and_fill(keep_map, path, **kwargs):
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / "theirs.txt").write_text("someone else's")
        return real_save_map(keep_map, path, **kwargs)

    monkeypatch.setattr(maps, "save_map", save_and_fill)
    with pytest.raises(FileExistsError, match="is not an empty folder"):
        save_map_frames(fade_maps(STILL, 3, (0, 2)), tmp_path / "out")
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert frame_files(tmp_path / "out") == ["theirs.txt"]
