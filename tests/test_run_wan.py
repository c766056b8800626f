"""Wan/run.py, video-to-video with a map, end to end on the tiny Wan saved to a folder. It is not an entry of
tests/test_run_contract.py, whose runs write and read PNGs (masks, crops, PNG text, a 2x2 image): here the output is an
mp4, and each run's frames must equal what the pipeline gives when called directly with the same settings, both
encoded by the same writer (H.264 is lossy, and deterministic), and the command in its metadata must make it again."""

import json
import re
import shlex
import signal

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, load_pipeline, run_in_process
from diffusers import WanVideoToVideoPipeline
from PIL import Image

from tests.tiny_models import save_stock, test_image
from tests.video_models import wan_components
from tools import cli, loading, results
from tools.crop import edit_on_crop
from Wan.diff_pipe import WanDiffVideoToVideoPipeline

SIZE, FRAMES, FPS, STEPS, SEED, PROMPT = 32, 5, 8, 2, 3, "a red apple"
NEGATIVE_PROMPT = (REPO_ROOT / "assets" / "negative_prompt.txt").read_text().strip()  # run.py's default


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return save_stock(WanVideoToVideoPipeline, wan_components, tmp_path_factory.mktemp("wan"))


@pytest.fixture(scope="module")
def direct(wan_dir):
    """The pipeline called as a user would, with run.py's settings and seed: its frames (PIL)."""
    pipe = load_pipeline(wan_dir, WanDiffVideoToVideoPipeline)

    def call(video, map, **kwargs):
        return pipe(video=video, map=map, prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, height=SIZE, width=SIZE,
                    num_inference_steps=STEPS, guidance_scale=1.0, output_type="pil",
                    generator=torch.Generator().manual_seed(SEED), **kwargs).frames[0]
    return call


def write_video(path, frames, fps=FPS):
    imageio.mimwrite(path, [np.asarray(frame) for frame in frames], fps=fps, macro_block_size=16)
    return path


def decoded(path, gray=False):
    """An mp4's frames as arrays (RGB, or the gray values run.py reads a map video's frames as)."""
    with imageio.get_reader(path) as reader:
        return [np.asarray(Image.fromarray(frame).convert("L" if gray else "RGB")) for frame in reader]


def clip_frames(seed=0):
    return [test_image(SIZE, seed=100 * seed + frame) for frame in range(FRAMES)]


@pytest.fixture
def clip(tmp_path):
    """A 5-frame mp4 and a still map whose left half changes fully."""
    keep = np.full((SIZE, SIZE), 255, np.uint8)
    keep[:, : SIZE // 2] = 0
    Image.fromarray(keep).save(tmp_path / "map.png")
    return write_video(tmp_path / "clip.mp4", clip_frames()), tmp_path / "map.png"


def run(wan_dir, tmp_path, *flags):
    return run_in_process("Wan/run.py", "--model", wan_dir, "--device", "cpu", "--frames", FRAMES, "--height", SIZE,
                          "--width", SIZE, "--steps", STEPS, "--guidance-scale", 1, "--prompt", PROMPT,
                          "--seed", SEED, *flags, cwd=tmp_path)


def same_encoding(frames, path, fps=FPS):
    """``frames`` (the direct call's) through run.py's own writer at the same frame rate (the encoder's rate control
    depends on it), decoded."""
    return decoded(results.write_mp4(frames, path, fps))


def test_a_video_gives_the_direct_calls_mp4_with_its_parameters_and_its_command_makes_it_again(wan_dir, direct, clip,
                                                                                               tmp_path):
    video, map_path = clip
    ran = run(wan_dir, tmp_path, "--video", video, "--map", map_path, "--strength", "0.5", "--keep-exact", "--compare",
              "--output", "edit.mp4")
    assert ran.returncode == 0, ran.stderr
    assert re.fullmatch(r"edit\.mp4 \(\d+\.\ds, 1 denoising step\); comparison: edit-compare\.mp4\n", ran.stdout)
    assert [line for line in ran.stderr.splitlines() if line.startswith(("error", "warning:"))] == [
        "warning: running on the CPU in fp32; this takes minutes"] or "CPU" not in ran.stderr
    edited = decoded(tmp_path / "edit.mp4")
    expected = direct([Image.fromarray(frame) for frame in decoded(video)], Image.open(map_path), strength=0.5,
                      keep_exact=True)
    assert len(edited) == FRAMES and all(np.array_equal(a, b) for a, b in zip(edited,
                                                                          same_encoding(expected, tmp_path / "d.mp4")))
    strips = decoded(tmp_path / "edit-compare.mp4")
    assert len(strips) == FRAMES and strips[0].shape == (SIZE, 3 * SIZE, 3)  # input | map | output

    text = results.mp4_parameters(tmp_path / "edit.mp4")
    assert {key: text[key] for key in ("video", "map", "frames", "height", "width", "fps", "strength", "steps_run",
                                       "keep_exact", "seed")} == {
        "video": str(video), "map": str(map_path), "frames": "5", "height": "32", "width": "32", "fps": "8.0",
        "strength": "0.5", "steps_run": "1", "keep_exact": "True", "seed": str(SEED)}
    assert "image" not in text  # --video stands in for the example image
    words = shlex.split(text["command"])
    again = run_in_process(words[1], *words[2:], "--output", "again.mp4", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert all(np.array_equal(a, b) for a, b in zip(decoded(tmp_path / "again.mp4"), edited))


def test_crop_margin_edits_the_box_of_the_change_in_every_frame_as_tools_crop_does(wan_dir, clip, tmp_path):
    keep = np.full((SIZE, SIZE), 255, np.uint8)
    keep[:8, :8] = 0  # one latent cell of 8 px: the crop is the top-left 16 x 16 px, the size unit
    Image.fromarray(keep).save(tmp_path / "corner.png")
    ran = run(wan_dir, tmp_path, "--video", clip[0], "--map", "corner.png", "--crop-margin", "0", "--keep-exact",
              "--output", "crop.mp4")
    assert ran.returncode == 0, ran.stderr
    frames = [Image.fromarray(frame) for frame in decoded(clip[0])]
    pipe = load_pipeline(wan_dir, WanDiffVideoToVideoPipeline)
    expected, box = edit_on_crop(pipe, 0, video=frames, map=Image.open(tmp_path / "corner.png"), prompt=PROMPT,
                                 negative_prompt=NEGATIVE_PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                                 guidance_scale=1.0, keep_exact=True, output_type="pil",
                                 generator=torch.Generator().manual_seed(SEED))
    assert box == (0, 0, 16, 16)
    edited = decoded(tmp_path / "crop.mp4")
    assert all(np.array_equal(a, b) for a, b in zip(edited, same_encoding(expected[0], tmp_path / "d.mp4")))
    text = results.mp4_parameters(tmp_path / "crop.mp4")
    assert (text["crop_margin"], text["crop_upscale"]) == ("0", "False") and "--crop-margin 0" in text["command"]


def test_a_still_image_with_one_map_per_frame_from_a_folder(wan_dir, direct, tmp_path):
    test_image(SIZE).save(tmp_path / "photo.png")
    (tmp_path / "maps").mkdir()
    keeps = [1.0, 0.0, 0.0, 0.0, 0.0]  # frame 0 kept, the next latent frame changed
    for frame, keep in enumerate(keeps):
        Image.fromarray(np.full((SIZE, SIZE), round(255 * keep), np.uint8)).save(tmp_path / f"maps/{frame:02}.png")
    ran = run(wan_dir, tmp_path, "--image", "photo.png", "--map", "maps")
    assert ran.returncode == 0, ran.stderr
    assert re.fullmatch(r"output\.mp4 \(\d+\.\ds, 2 denoising steps\)\n", ran.stdout)
    maps = [Image.open(path) for path in sorted((tmp_path / "maps").iterdir())]
    expected = direct([test_image(SIZE)] * FRAMES, maps)
    assert all(np.array_equal(a, b) for a, b in zip(decoded(tmp_path / "output.mp4"),
                                                    same_encoding(expected, tmp_path / "d.mp4", fps=16)))
    text = results.mp4_parameters(tmp_path / "output.mp4")  # a still image has no frame rate: Wan 2.1's 16
    assert (text["image"], text["map"], text["fps"], "video" in text) == ("photo.png", "maps", "16", False)


def test_a_map_video_of_another_shape_is_one_map_per_frame_stretched_with_a_warning(wan_dir, direct, clip, tmp_path):
    video, _ = clip
    wide = [Image.fromarray(np.tile(np.uint8(60 * frame), (SIZE, 2 * SIZE))) for frame in range(FRAMES)]
    map_video = write_video(tmp_path / "maps.mp4", [frame.convert("RGB") for frame in wide])
    ran = run(wan_dir, tmp_path, "--video", video, "--map", map_video, "--output", "out.mp4")
    assert ran.returncode == 0, ran.stderr
    assert "warning: the map (64x32) has another shape than the video (32x32); it is stretched to fit" in \
        ran.stderr.splitlines()
    maps = [cli.stretch_map(Image.fromarray(frame), (SIZE, SIZE)) for frame in decoded(map_video, gray=True)]
    expected = direct([Image.fromarray(frame) for frame in decoded(video)], maps)
    assert all(np.array_equal(a, b) for a, b in zip(decoded(tmp_path / "out.mp4"),
                                                    same_encoding(expected, tmp_path / "d.mp4")))


@pytest.mark.parametrize("case, flags, status, message", [
    ("frames not 1 + 4k", ["--frames", "6"], 2, "--frames 6: Wan's VAE encodes frame 0 alone, then 4 at a time, so "
     "it takes 1 + 4k frames, and stock drops the frames beyond the last such count; pass --frames 5 or 9"),
    ("too few frames", ["--frames", "9"], 2, "has 5 frames, fewer than --frames 9; pass --frames 5"),
    ("map frame count", ["--map", "{maps3}"], 2, "has 3 frames but the video has 5: give one map per frame, or one"),
    ("unreadable video", ["--video", "{bad}"], 2, "bad.mp4: cannot read it as a video"),
    ("missing video", ["--video", "nowhere.mp4"], 2, "--video nowhere.mp4: no such file"),
    ("missing map video", ["--map", "nowhere.mp4"], 2, "--map nowhere.mp4: no such file"),
    ("png output", ["--output", "out.png"], 2, "--output out.png: give a file name ending with .mp4"),
    ("output is the video", ["--output", "{video}", "--overwrite"], 2, "is the --video file"),
    ("existing output", ["--output", "{taken}"], 2, "taken.mp4 already exists; pass --overwrite"),
    ("video and image", ["--image", "{map}"], 2, "--video and --image are alternatives"),
    ("height", ["--height", "40"], 2, "--height: must be a multiple of 16"),
    ("sampler", ["--scheduler", "euler"], 2, "leave --scheduler default"),
    ("another family", ["--model", "{sd_dir}"], 2, "for SD2/run.py; here --model takes a Wan checkpoint"),
    ("Wan image-to-video", ["--model", "{i2v}"], 2, "a Wan image-to-video checkpoint (WanImageToVideoPipeline), for "
     "no run.py here: Wan/run.py takes Wan 2.1 text-to-video; here --model takes a Wan checkpoint"),
    ("Wan 2.2 A14B", ["--model", "{experts}"], 2, "a Wan 2.2 checkpoint (two experts, a second transformer for the "
     "low-noise steps), which stock Wan 2.1 video-to-video does not run; pass a Wan 2.1 text-to-video checkpoint"),
    ("Wan 2.2 TI2V", ["--model", "{ti2v}"], 2, "a Wan 2.2 checkpoint (a timestep per token, on Wan 2.2's own VAE)"),
])
def test_bad_input_gives_one_line_and_writes_nothing(case, flags, status, message, wan_dir, clip, tmp_path, request):
    video, map_path = clip
    (tmp_path / "bad.mp4").write_text("not a video")
    write_video(tmp_path / "maps3.mp4", clip_frames()[:3])
    (tmp_path / "taken.mp4").write_bytes(b"mine")
    names = {"maps3": tmp_path / "maps3.mp4", "bad": tmp_path / "bad.mp4", "video": video, "map": map_path,
             "taken": tmp_path / "taken.mp4"}
    index = json.loads((wan_dir / "model_index.json").read_text())
    for name, change in [("i2v", {"_class_name": "WanImageToVideoPipeline"}),  # what the Hub's model_index.json hold
                         ("experts", {"transformer_2": ["diffusers", "WanTransformer3DModel"],
                                      "boundary_ratio": 0.875}),
                         ("ti2v", {"transformer_2": [None, None], "expand_timesteps": True})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps({**index, **change}))
        names[name] = tmp_path / name
    flags = [re.sub(r"\{(\w+)\}", lambda match: str(names.get(match[1]) or request.getfixturevalue(match[1])), flag)
             for flag in flags]
    ran = run(wan_dir, tmp_path, "--video", video, "--map", map_path, *flags)
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    assert (ran.returncode, ran.stdout, len(errors)) == (status, "", 1), ran.stderr
    assert message in errors[0] and "Traceback" not in ran.stderr, errors
    assert sorted(path.name for path in tmp_path.glob("*.mp4")) == ["bad.mp4", "clip.mp4", "maps3.mp4", "taken.mp4"]
    assert (tmp_path / "taken.mp4").read_bytes() == b"mine"


def test_ctrl_c_stops_after_the_step_it_came_in_and_writes_nothing(wan_dir, clip, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    steps, progress_bar = [], DiffusionPipeline.progress_bar

    def pressing(pipe, *args, **kwargs):  # Ctrl-C at the end of the first step that runs with run.py's handler
        bar = progress_bar(pipe, *args, **kwargs)
        update = bar.update

        def step_done(*args):
            if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                steps.append(pipe)
                if len(steps) == 1:
                    signal.raise_signal(signal.SIGINT)
            return update(*args)
        bar.update = step_done
        return bar

    monkeypatch.setattr(DiffusionPipeline, "progress_bar", pressing)
    ran = run(wan_dir, tmp_path, "--video", clip[0], "--map", clip[1], "--steps", "6", "--output", "out.mp4")
    assert (ran.returncode, ran.stderr.splitlines()[-1]) == (130, "error: interrupted"), ran.stderr
    assert len(steps) == 1 and not (tmp_path / "out.mp4").exists() and list(tmp_path.glob(".*partial")) == []


def test_help_documents_every_flag_and_the_metadata():
    parser = loading.load_family("wan").build_parser()
    assert all(action.help for action in parser._actions)
    words = parser.format_help().split()
    spaced, joined = " ".join(words), "".join(words)  # argparse wraps lines, at spaces and at hyphens
    for said in ("--video", "--frames", "--fps", "1 + 4k", "(default: 81)", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                 "(default: 480)", "(default: 832)", "comment tag", "-compare.mp4", "(default: 5)", "(default: 50)"):
        assert said in spaced or "".join(said.split()) in joined, said


def test_tools_batch_edits_video_rows_as_run_py_does_resumes_them_and_refuses_what_it_cannot_run(
        wan_dir, clip, tmp_path, capsys, monkeypatch):
    from tools import batch

    video, map_path = clip
    test_image(SIZE, seed=9).save(tmp_path / "photo.png")
    (tmp_path / "jobs.csv").write_text("video,image,map,prompt,seed,output\n"
                                       "clip.mp4,,map.png,a red apple,3,\n"
                                       ",photo.png,map.png,a blue pear,4,still/pear.mp4\n")
    settings = ["--model", wan_dir, "--device", "cpu", "--frames", FRAMES, "--height", SIZE, "--width", SIZE,
                "--steps", STEPS, "--guidance-scale", 1]
    argv = [str(flag) for flag in ["--family", "wan", tmp_path / "jobs.csv", "--output-dir", tmp_path / "out",
                                   *settings]]
    assert batch.run(argv) == 0
    first = tmp_path / "out" / "0001-clip.mp4"
    alone = run(wan_dir, tmp_path, "--video", video, "--map", map_path, "--output", "alone.mp4")
    assert alone.returncode == 0, alone.stderr
    assert all(np.array_equal(a, b) for a, b in zip(decoded(first), decoded(tmp_path / "alone.mp4"), strict=True))
    text = results.mp4_parameters(tmp_path / "out" / "still" / "pear.mp4")
    assert (text["image"], text["prompt"], text["seed"], text["fps"], text["line"]) == (
        str(tmp_path / "photo.png"), "a blue pear", "4", "16", "3")
    words = shlex.split(text["command"])  # the row alone, by run.py
    again = run_in_process(words[1], *words[2:], "--output", "again.mp4", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert all(np.array_equal(a, b) for a, b in zip(decoded(tmp_path / "again.mp4"),
                                                    decoded(tmp_path / "out" / "still" / "pear.mp4"), strict=True))
    capsys.readouterr()
    assert batch.run(argv) == 0  # a second run finds both rows done
    assert "0 done, 2 skipped (already done), 0 failed of 2 rows" in capsys.readouterr().out

    (tmp_path / "bad.csv").write_text("video,image,map,prompt,output\nclip.mp4,photo.png,map.png,x,\n"
                                      "clip.mp4,,map.png,x,out.png\nnowhere.mp4,,map.png,x,\n")
    monkeypatch.chdir(tmp_path)  # where the messages name the jobs file as bad.csv
    with pytest.raises(cli.CliError, match="3 bad rows"):
        batch.run([*argv[:2], str(tmp_path / "bad.csv"), *argv[3:]])
    assert capsys.readouterr().err.splitlines() == [
        "bad.csv:2: has both a video and an image (a still image edited as a video); give one of them",
        "bad.csv:3: output out.png: give a file name ending with .mp4 (the parameters are stored in its comment tag)",
        "bad.csv:4: video nowhere.mp4: no such file"]
    with pytest.raises(cli.CliError, match="--family wan edits one video a call"):
        batch.run([*argv, "--batch-size", "2"])
    with pytest.raises(cli.CliError, match="3 bad rows"):  # an image family refuses the video column
        batch.run(["--family", "sd2", str(tmp_path / "bad.csv"), "--output-dir", str(tmp_path / "sd")])
    assert capsys.readouterr().err.splitlines()[:3] == [  # a row with no image used to end in a traceback
        "bad.csv:2: video: --family sd2 edits images; the video column is for a family that edits videos (wan)",
        "bad.csv:3: video: --family sd2 edits images; the video column is for a family that edits videos (wan)",
        "bad.csv:3: no image: fill the image column, or pass --image"]
