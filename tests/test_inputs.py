"""Inputs that run.py and tools.batch share (tools/cli.py): piped maps, misleading map files, batch's refusals."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tools import cli, batch, loading, results


def test_a_map_from_a_pipe_is_read_once_and_recorded_as_a_pipe(inputs, tmp_path, capsys):
    # `--map <(cat map.png)`: the header check consumed the pipe, and the load then found it empty; no rerun can read it
    read, write = os.pipe()
    os.write(write, inputs[1].read_bytes())
    os.close(write)
    args = cli.parse_args(loading.load_family("sd2").build_parser(),
                          ["--image", str(inputs[0]), "--map", f"/dev/fd/{read}", "--output", f"{tmp_path}/o.png"])
    os.close(read)
    assert np.array_equal(np.asarray(cli.load_inputs(args)[1]), np.asarray(Image.open(inputs[1])))
    assert "(a pipe: /dev/fd/" in results.png_parameters(args, 0)["map"] and " is a pipe: " in capsys.readouterr().err


def gray_frames(count, alpha=255):
    return [Image.new("LA", (8, 8), (255 * (n % 2), alpha)) for n in range(count)]


@pytest.mark.parametrize("frames, suffix, message", [
    (gray_frames(1, alpha=0), ".png", "has transparent pixels, and only its gray values count; fill them"),
    (gray_frames(3), ".gif", "has 3 frames, and a map is one image; save the frame you mean as a PNG"),
    (gray_frames(1), ".png", None),  # opaque: its alpha says nothing
], ids=["transparent", "animated", "opaque alpha"])
def test_a_map_with_transparency_or_frames_is_refused_in_one_line(frames, suffix, message, tmp_path):
    path = tmp_path / f"map{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    for flag in ("--map", "--mask"):
        if message is None:
            assert cli.read_image(path, flag, gray=True).size == (8, 8)
            continue
        with pytest.raises(cli.CliError, match=f"^{flag} {path}: {message}"):
            cli.read_image(path, flag, gray=True)


def test_batch_refuses_a_prompt_that_is_not_utf8_and_an_output_dir_that_is_a_file(sd_dir, inputs, tmp_path, capsys):
    image, map_path = inputs
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"image": str(image), "map": str(map_path), "prompt": "caf\udce9"}) + "\n")
    flags = ["--family", "sd2", str(jobs), "--model", str(sd_dir), "--device", "cpu", "--output-dir"]
    with pytest.raises(cli.CliError, match="1 bad row"):
        batch.run([*flags, str(tmp_path / "out")])
    assert "jobs.jsonl:1: prompt: character 4 is the byte 0xE9, which is not UTF-8 text" in capsys.readouterr().err
    with pytest.raises(cli.CliError, match="^--prompt: character 1 is a lone surrogate"):
        batch.run([*flags, str(tmp_path / "out"), "--prompt", "\ud800"])
    with pytest.raises(cli.CliError, match=f"^--output-dir {jobs}/out: {jobs} is a file, not a folder; name a"):
        batch.run([*flags, str(jobs / "out")])
    assert not (tmp_path / "out").exists()


def test_a_large_image_opens_without_pillows_two_line_warning(tmp_path, monkeypatch, recwarn):
    Image.new("L", (64, 64)).save(tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096 pixels: past the warning, short of the error
    assert cli.read_image(tmp_path / "large.png", "--map").size == (64, 64)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
