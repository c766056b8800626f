"""tools/adherence.py: rank correlation, per-bin change, the chart and the command, on synthetic images."""

import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

from tools import adherence

# Spearman


def test_average_ranks_share_tied_positions():
    assert adherence.average_ranks(np.array([10, 20, 20, 30, 20])).tolist() == [1, 3, 3, 5, 3]
    assert adherence.average_ranks(np.array([[2.0, 1.0], [1.0, 2.0]])).tolist() == [3.5, 1.5, 1.5, 3.5]


LINE = np.linspace(-3, 3, 101)


@pytest.mark.parametrize("x, y, rho", [
    (LINE, LINE**3 + 5, 1.0), (LINE, np.exp(-LINE), -1.0),  # monotone, not linear
    (np.repeat([0.0, 0.5, 1.0], 4), np.repeat([1.0, 7.0, 9.0], 4), 1.0),
    # ranks of x: 1, 2.5, 2.5, 4; of y: 1, 3, 2, 4. Centred: (-1.5, 0, 0, 1.5) and (-1.5, 0.5, -0.5, 1.5):
    # sum of products 4.5, sums of squares 4.5 and 5, so rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9).
    ([1, 2, 2, 3], [1, 3, 2, 4], math.sqrt(0.9)),
    ([1, 1, 2, 2], [1, 2, 3, 4], 2 / math.sqrt(5)),  # ranks 1.5, 1.5, 3.5, 3.5 against 1..4: 4 / sqrt(4 * 5)
], ids=["cube", "reversed", "tied monotone", "ties by hand", "tied pairs by hand"])
def test_spearman_of_monotone_relations_and_hand_computed_ties(x, y, rho):
    assert adherence.spearman(x, y) == pytest.approx(rho, abs=1e-12)


def test_spearman_matches_scipy_on_tied_random_data():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 500).astype(float)  # many ties, as quantised maps have
    y = x + rng.normal(0, 2, 500).round()
    assert adherence.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_of_a_constant_sample_is_undefined():
    assert math.isnan(adherence.spearman([0.5, 0.5, 0.5], [1, 2, 3]))
    assert math.isnan(adherence.spearman([1], [2]))
    with pytest.raises(ValueError, match="equal length"):
        adherence.spearman([1, 2], [1, 2, 3])


# Bins


def test_bin_table_puts_edges_in_the_bin_above_and_one_in_the_last():
    requested = np.array([0.0, 0.05, 0.3, 0.3, 1 - np.float32(0.3), 1.0, 0.999])
    change = np.array([1.0, 3.0, 10.0, 20.0, 70.0, 100.0, 80.0])
    rows = adherence.bin_table(requested, change, bins=10)
    assert [row.pixels for row in rows] == [2, 0, 0, 2, 0, 0, 1, 0, 0, 2]
    assert rows[0].change == 2.0 and rows[3].change == 15.0 and rows[9].change == 90.0
    assert rows[0].requested == 0.025 and rows[9].requested == pytest.approx(0.9995)
    assert math.isnan(rows[1].change) and rows[1].lpips is None
    assert (rows[3].low, rows[3].high) == (0.3, 0.4)
    assert 0.7 > requested[4] > 0.69  # float32's 0.3 makes 0.69999..., which belongs below 0.7
    assert rows[6].pixels == 1


def band_inputs(folder, keep_values=(255, 160, 64, 0), deltas=(0, 10, 20, 40), size=(64, 48)):
    """An input, a map of vertical bands and an output that changes each band by a known amount."""
    width, height = size
    rng = np.random.default_rng(0)
    image = rng.integers(50, 150, (height, width, 3)).astype(np.uint8)
    band = np.arange(width) * len(keep_values) // width
    keep = np.array(keep_values, np.uint8)[band][None, :].repeat(height, 0)
    signs = rng.choice([-1, 1], image.shape)
    output = (image + signs * np.array(deltas)[band][None, :, None]).astype(np.uint8)
    paths = folder / "input.png", folder / "map.png", folder / "edit.png"
    for path, array in zip(paths, (image, keep, output)):
        Image.fromarray(array).save(path)
    return paths


def test_report_gives_each_bands_change_and_rank_correlation(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # as if lpips were not installed
    image, map_path, output = band_inputs(tmp_path)
    adherence.run(["--image", str(image), "--map", str(map_path), "--output", str(output), "--bins", "4"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    # Bands of strength 0, 95/255, 191/255 and 1 land in bins 0 to 3 and changed by 0, 10, 20 and 40.
    rows = [line.split() for line in lines[2:6]]
    assert [row[3] for row in rows] == ["768", "768", "768", "768"]
    assert [row[4] for row in rows] == ["0.000", f"{95 / 255:.3f}", f"{191 / 255:.3f}", "1.000"]
    assert [row[5] for row in rows] == ["0.00", "10.00", "20.00", "40.00"]
    assert "install the lpips package" in out
    assert lines[-1].endswith("over all pixels: 1.0000")


def test_invert_map_and_strength_change_the_requested_strength(tmp_path):
    image, map_path, output = band_inputs(tmp_path, keep_values=(0, 255))
    keep = Image.open(map_path)
    assert adherence.requested_strength(keep, (64, 48))[0, [0, -1]].tolist() == [1.0, 0.0]
    assert adherence.requested_strength(keep, (64, 48), invert_map=True)[0, [0, -1]].tolist() == [0.0, 1.0]
    assert adherence.requested_strength(keep, (64, 48), strength=0.5)[0, [0, -1]].tolist() == [0.5, 0.0]


def test_lpips_column_when_the_package_is_there(tmp_path, capsys, monkeypatch):
    class FakeLPIPS:  # LPIPS's interface: tensors in [-1, 1], a spatial map (1, 1, H, W) of distances
        def __init__(self, net, spatial, verbose):
            assert (net, spatial) == ("alex", True)

        def __call__(self, before, after):
            return (after - before).abs().mean(dim=1, keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    image, map_path, output = band_inputs(tmp_path)
    adherence.run(["--image", str(image), "--map", str(map_path), "--output", str(output), "--bins", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "LPIPS"
    # The fake's distance is |change| / 127.5 per pixel.
    assert [line.split()[6] for line in lines[2:6]] == [f"{d / 127.5:.4f}" for d in (0, 10, 20, 40)]


# Chart


def test_chart_has_the_requested_size_draws_on_white_and_survives_empty_bins(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)
    image, map_path, output = band_inputs(tmp_path)
    base = ["--image", str(image), "--map", str(map_path), "--output", str(output)]
    adherence.run([*base, "--chart", str(tmp_path / "chart.png")])
    adherence.run([*base, "--chart", str(tmp_path / "wide.png"), "--chart-size", "640x360"])
    assert capsys.readouterr().out.splitlines()[-1] == f"chart: {tmp_path / 'wide.png'}"
    with Image.open(tmp_path / "chart.png") as chart, Image.open(tmp_path / "wide.png") as wide:
        assert chart.size == adherence.CHART_SIZE and wide.size == (640, 360)
        pixels = np.asarray(chart.convert("RGB"))
    assert (pixels == 255).all(axis=-1).mean() > 0.5  # mostly background
    assert ((pixels[..., 2] > 150) & (pixels[..., 0] < 60)).any()  # the blue line of the means
    # Empty bins are skipped, and no change at all is drawn too.
    rows = adherence.bin_table(np.zeros(10), np.zeros(10), bins=5)
    assert adherence.draw_chart(rows, math.nan, size=(300, 200)).size == (300, 200)


# Sizes and bad input


def test_input_of_the_same_shape_is_resized_and_a_map_of_another_shape_stretched_with_warnings(tmp_path, capsys,
                                                                                              monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)
    image, map_path, output = band_inputs(tmp_path)
    Image.open(image).resize((128, 96)).save(tmp_path / "large.png")
    adherence.run(["--image", str(tmp_path / "large.png"), "--map", str(map_path), "--output", str(output)])
    err = capsys.readouterr().err
    assert err.startswith("warning: the input (128x96) is resized to the output's size (64x48)")
    Image.open(map_path).resize((32, 32), Image.Resampling.NEAREST).save(tmp_path / "square.png")
    adherence.run(["--image", str(image), "--map", str(tmp_path / "square.png"), "--output", str(output)])
    assert "the map (32x32) has another shape than the output (64x48)" in capsys.readouterr().err


BAD_INPUTS = {
    "input of another shape": (["--image", "square.png"], ["--output", "64x48", "--image", "32x32", "another shape"]),
    "missing output": (["--output", "nope.png"], ["--output", "nope.png", "no such file"]),
    "map not an image": (["--map", "notes.txt"], ["--map", "not an image"]),
    "no bins": (["--bins", "0"], ["--bins", "from 1 to 100"]),
    "chart not png": (["--chart", "chart.jpg"], ["--chart chart.jpg: give a .png file"]),
    "chart exists": (["--chart", "taken.png"], ["taken.png already exists", "--overwrite"]),
    "chart is the input": (["--chart", "input.png", "--overwrite"], ["--image file", "never overwritten"]),
    "chart is the edit": (["--chart", "edit.png", "--overwrite"], ["--chart edit.png is the --output file"]),
    "chart folder missing": (["--chart", "no/such/chart.png"], ["--chart", "in an existing folder"]),
    "bad chart size": (["--chart-size", "10x10"], ["--chart-size", "200 to 8000"]),
    "strength above 1": (["--strength", "2"], ["--strength", "from 0 to 1"]),
    "missing flag": (["--map", None], ["--map"]),
}


@pytest.mark.parametrize("change, fragments", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_gives_one_line(tmp_path, capsys, monkeypatch, change, fragments):
    monkeypatch.chdir(tmp_path)
    band_inputs(tmp_path)
    Image.new("RGB", (32, 32)).save("square.png")
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "taken.png").write_bytes(b"the user's file")
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    flags = {"--image": "input.png", "--map": "map.png", "--output": "edit.png"}
    extra = []
    for flag, value in zip(change[::2], change[1::2]):
        if flag in flags:
            flags[flag] = value
        else:
            extra += [flag, value]
    argv = [token for flag, value in flags.items() if value is not None for token in (flag, value)] + extra
    with pytest.raises(SystemExit) as exit_info:
        adherence.main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_runs_as_a_module(tmp_path):
    image, map_path, output = band_inputs(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "tools.adherence", "--image", image, "--map", map_path, "--output", output,
         "--chart", tmp_path / "chart.png"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Spearman rank correlation" in result.stdout and (tmp_path / "chart.png").is_file()
