import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT  # conftest also keeps every test off the Hub
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.tiny_models import save_depth_model
from tools import maps
from tools.maps import depth_map, feathered_mask, linear_gradient, radial, region_map, save_map


def brute_force_distance(region: np.ndarray) -> np.ndarray:
    """Distance from every pixel centre to the nearest True pixel centre, by checking every pair."""
    rows, cols = np.nonzero(region)
    y, x = np.mgrid[: region.shape[0], : region.shape[1]]
    if len(rows) == 0:
        return np.full(region.shape, np.inf)
    squared = (y[..., None] - rows) ** 2 + (x[..., None] - cols) ** 2
    return np.sqrt(squared.min(axis=-1))


def expected_feather(distance, feather_px, grow_px):
    """The documented profile, written out independently of the implementation."""
    u = (distance - grow_px) / feather_px
    if distance <= grow_px:
        return 0.0
    if u >= 1:
        return 1.0
    return (1 - math.exp(-9 * u * u / 2)) / (1 - math.exp(-9 / 2))


# ----------------------------------------------------------------------------------------------------------------------
# linear_gradient
# ----------------------------------------------------------------------------------------------------------------------


def test_gradient_default_keeps_the_right_and_changes_the_left():
    keep_map = linear_gradient(64, 40)
    assert keep_map.shape == (40, 64) and keep_map.dtype == np.float32
    assert np.all(keep_map[:, 0] == 0.0) and np.all(keep_map[:, -1] == 1.0)
    assert np.all(keep_map == keep_map[0])  # every row is the same
    assert np.all(np.diff(keep_map[0]) > 0)


def test_gradient_right_angles():
    keep_map = linear_gradient(8, 6)
    np.testing.assert_array_equal(linear_gradient(8, 6, 180), keep_map[:, ::-1])
    upward = linear_gradient(8, 6, 90)  # bottom to top: the bottom row starts (0), the top row ends (1)
    assert np.all(upward[-1] == 0.0) and np.all(upward[0] == 1.0)
    assert np.all(upward == upward[:, :1])  # every column is the same
    np.testing.assert_array_equal(linear_gradient(8, 6, 270), upward[::-1])
    np.testing.assert_array_equal(linear_gradient(8, 6, 360), keep_map)


def test_gradient_start_and_end():
    keep_map = linear_gradient(11, 3, start=0.8, end=0.2)
    np.testing.assert_allclose(keep_map[0], np.linspace(0.8, 0.2, 11), atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(angle=st.floats(-720, 720, allow_nan=False), width=st.integers(2, 30), height=st.integers(2, 30))
def test_gradient_is_monotone_along_its_angle(angle, width, height):
    keep_map = linear_gradient(width, height, angle)
    assert keep_map.min() == 0.0 and keep_map.max() == 1.0
    # Counterclockwise on screen: rows grow downwards, so the ramp rises along +x for cos > 0 and along -y for sin > 0.
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    along_x, along_y = np.diff(keep_map, axis=1), np.diff(keep_map, axis=0)
    tolerance = 1e-6
    if cos > 1e-9:
        assert along_x.min() >= -tolerance
    if cos < -1e-9:
        assert along_x.max() <= tolerance
    if sin > 1e-9:
        assert along_y.max() <= tolerance
    if sin < -1e-9:
        assert along_y.min() >= -tolerance


def test_gradient_one_pixel_long_takes_the_midpoint():
    np.testing.assert_array_equal(linear_gradient(1, 4), np.full((4, 1), 0.5, np.float32))


# ----------------------------------------------------------------------------------------------------------------------
# radial
# ----------------------------------------------------------------------------------------------------------------------


def test_radial_is_symmetric_about_the_default_centre():
    keep_map = radial(33, 33, inner_radius=3, outer_radius=12)
    np.testing.assert_array_equal(keep_map, keep_map[:, ::-1])
    np.testing.assert_array_equal(keep_map, keep_map[::-1])
    np.testing.assert_array_equal(keep_map, keep_map.T)
    assert keep_map[16, 16] == 0.0 and keep_map[0, 0] == 1.0
    even = radial(20, 10)
    np.testing.assert_array_equal(even, even[:, ::-1])
    np.testing.assert_array_equal(even, even[::-1])


def test_radial_follows_distance_from_the_centre():
    keep_map = radial(40, 30, center=(10, 12), inner_radius=4, outer_radius=14, inside=0.2, outside=0.9)
    assert keep_map.shape == (30, 40)
    y, x = np.mgrid[:30, :40]
    distance = np.hypot(x - 10, y - 12)
    np.testing.assert_allclose(keep_map[distance <= 4], 0.2, atol=1e-7)
    np.testing.assert_allclose(keep_map[distance >= 14], 0.9, atol=1e-7)
    between = (distance > 4) & (distance < 14)
    np.testing.assert_allclose(keep_map[between], 0.2 + 0.7 * (distance[between] - 4) / 10, atol=1e-6)


def test_radial_equal_radii_give_a_hard_edge():
    keep_map = radial(21, 21, inner_radius=5, outer_radius=5)
    assert set(np.unique(keep_map)) == {0.0, 1.0}
    assert keep_map[10, 15] == 0.0 and keep_map[10, 16] == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# feathered_mask
# ----------------------------------------------------------------------------------------------------------------------


def test_feather_profile_around_a_single_pixel():
    fill = np.zeros((41, 41), dtype=bool)
    fill[20, 20] = True
    keep_map = feathered_mask(fill, feather_px=12, grow_px=3)
    for dx in range(0, 21):
        expected = expected_feather(dx, feather_px=12, grow_px=3)
        assert keep_map[20, 20 + dx] == pytest.approx(expected, abs=1e-6), dx
    assert keep_map[20, 20] == 0.0  # the region to fill changes fully
    assert keep_map[20, 23] == 0.0  # grown by 3 pixels
    assert 0.0 < keep_map[20, 24] < 0.05  # the first pixel past the grown edge barely keeps
    assert keep_map[20, 35] == 1.0  # beyond grow + feather = 15 pixels: kept exactly
    assert keep_map[0, 0] == 1.0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), density=st.floats(0.0, 0.1), feather_px=st.floats(0.0, 20.0),
       grow_px=st.floats(0.0, 6.0))
def test_feather_is_monotone_in_distance_from_the_region(seed, density, feather_px, grow_px):
    fill = np.random.default_rng(seed).random((24, 37)) < density
    keep_map = feathered_mask(fill, feather_px=feather_px, grow_px=grow_px)
    distance = brute_force_distance(fill)

    assert keep_map.shape == fill.shape and keep_map.dtype == np.float32
    assert keep_map.min() >= 0.0 and keep_map.max() <= 1.0
    assert np.all(keep_map[fill] == 0.0)
    assert np.all(keep_map[distance <= grow_px] == 0.0)
    assert np.all(keep_map[distance >= grow_px + feather_px + 1e-9] == 1.0)
    order = np.argsort(distance, axis=None, kind="stable")
    assert np.all(np.diff(keep_map.ravel()[order]) >= 0)
    for d in np.unique(distance)[:12]:  # pixels at the same distance get the same value
        assert len(np.unique(keep_map[distance == d])) == 1


def test_feather_matches_the_documented_profile_everywhere():
    fill = np.zeros((30, 50), dtype=bool)
    fill[8:14, 10:18] = True
    fill[20, 40] = True
    keep_map = feathered_mask(fill, feather_px=9.5, grow_px=1.5)
    distance = brute_force_distance(fill)
    expected = np.vectorize(expected_feather)(distance, 9.5, 1.5)
    np.testing.assert_allclose(keep_map, expected, atol=1e-6)


def test_feather_zero_is_a_hard_inverted_mask():
    fill = np.random.default_rng(1).random((16, 16)) < 0.2
    np.testing.assert_array_equal(feathered_mask(fill, feather_px=0), (~fill).astype(np.float32))


def test_feather_of_an_empty_mask_keeps_everything():
    np.testing.assert_array_equal(feathered_mask(np.zeros((5, 7), bool), 4), np.ones((5, 7), np.float32))


def test_feather_reads_white_as_the_region_to_fill():
    fill = np.zeros((20, 30), dtype=bool)
    fill[5:9, 6:15] = True
    as_image = Image.fromarray(np.where(fill, 255, 0).astype(np.uint8))
    expected = feathered_mask(fill, 6, 1)
    np.testing.assert_array_equal(feathered_mask(as_image, 6, 1), expected)
    np.testing.assert_array_equal(feathered_mask(as_image.convert("RGB"), 6, 1), expected)
    np.testing.assert_array_equal(feathered_mask(fill.astype(np.float32), 6, 1), expected)
    np.testing.assert_array_equal(feathered_mask(fill.astype(np.int64), 6, 1), expected)
    assert np.all(expected[fill] == 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# region_map
# ----------------------------------------------------------------------------------------------------------------------

STRENGTHS = {0: 0.0, 1: 0.25, 2: 0.3, 7: 1.0}


def test_region_map_is_one_minus_each_strength():
    labels = np.random.default_rng(0).choice([0, 1, 2, 7], size=(13, 17))
    keep_map = region_map(labels, STRENGTHS)
    assert keep_map.shape == (13, 17) and keep_map.dtype == np.float32
    for label, strength in STRENGTHS.items():
        assert np.all(keep_map[labels == label] == np.float32(1 - strength))
    assert np.all(keep_map[labels == 0] == 1.0)  # strength 0 keeps
    assert np.all(keep_map[labels == 7] == 0.0)  # strength 1 changes fully


def test_region_map_reads_label_images():
    labels = np.random.default_rng(1).choice([0, 1, 2], size=(9, 11)).astype(np.uint8)
    expected = region_map(labels, STRENGTHS)
    palette_image = Image.fromarray(labels).convert("P")
    np.testing.assert_array_equal(region_map(Image.fromarray(labels), STRENGTHS), expected)
    from_palette = region_map(palette_image, STRENGTHS)
    np.testing.assert_array_equal(from_palette, region_map(np.asarray(palette_image), STRENGTHS))
    np.testing.assert_array_equal(region_map(Image.fromarray(labels.astype(np.uint16)), STRENGTHS), expected)


def test_region_map_names_unknown_labels():
    labels = np.array([[0, 1], [5, 9]])
    with pytest.raises(ValueError, match=r"\[5, 9\]"):
        region_map(labels, STRENGTHS)


# ----------------------------------------------------------------------------------------------------------------------
# Bad arguments of the four drawing makers

BAD_ARGUMENTS = [
    (linear_gradient, dict(width=0, height=4)), (linear_gradient, dict(width=4, height=-1)),
    (linear_gradient, dict(width=4.5, height=4)), (linear_gradient, dict(width=True, height=4)),
    (linear_gradient, dict(width=4, height=4, start=1.5)), (linear_gradient, dict(width=4, height=4, end=-0.1)),
    (linear_gradient, dict(width=4, height=4, angle_degrees=float("nan"))),
    (radial, dict(width=10, height=10, inner_radius=-1)),
    (radial, dict(width=10, height=10, inner_radius=5, outer_radius=4)),
    (radial, dict(width=10, height=10, center=(1, 2, 3))), (radial, dict(width=10, height=10, center=(1, np.inf))),
    (radial, dict(width=10, height=10, inside=2)),
    (feathered_mask, dict(mask=np.zeros((4, 4), bool), feather_px=-1)),
    (feathered_mask, dict(mask=np.zeros((4, 4), bool), feather_px=2, grow_px=-0.5)),
    (feathered_mask, dict(mask=np.zeros((4, 4), bool), feather_px=float("nan"))),
    (feathered_mask, dict(mask=np.zeros((4, 4, 3), bool), feather_px=2)),
    (feathered_mask, dict(mask=np.full((4, 4), 2, np.int64), feather_px=2)),
    (feathered_mask, dict(mask=np.full((4, 4), 1.5, np.float32), feather_px=2)),
    (region_map, dict(labels=np.zeros((3, 3), int), strengths={0: 1.2})),
    (region_map, dict(labels=np.zeros((3, 3), int), strengths={0: float("nan")})),
    (region_map, dict(labels=np.zeros((3, 3), float), strengths={0: 0.5})),
    (region_map, dict(labels=np.zeros((3, 3, 3), int), strengths={0: 0.5})),
    (region_map, dict(labels=Image.new("RGB", (3, 3)), strengths={0: 0.5})),
]


@pytest.mark.parametrize("maker, kwargs", BAD_ARGUMENTS)
def test_makers_reject_bad_arguments(maker, kwargs):
    with pytest.raises(ValueError):
        maker(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# depth_map
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory):
    """A Depth Anything model with random weights and tiny sizes, saved like a Hub checkpoint."""
    return save_depth_model(tmp_path_factory.mktemp("tiny-depth-anything"))


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(36, 52, 3), dtype=np.uint8))


def test_depth_map_shape_range_and_near_flag(tiny_depth_model, photo):
    near_keeps = depth_map(photo, model=str(tiny_depth_model), near="keep")
    assert near_keeps.shape == (36, 52) and near_keeps.dtype == np.float32
    assert near_keeps.min() == 0.0 and near_keeps.max() == 1.0  # rescaled to the full range
    near_changes = depth_map(photo, model=tiny_depth_model, near="change")  # a Path works too
    np.testing.assert_array_equal(near_changes, np.float32(1) - near_keeps)


def test_depth_map_treats_depth_and_disparity_oppositely(tiny_depth_model, photo):
    from transformers import pipeline

    estimator = pipeline("depth-estimation", model=str(tiny_depth_model))  # a built pipeline is accepted as it is
    as_disparity = depth_map(np.asarray(photo), model=estimator, prediction="disparity")
    as_depth = depth_map(photo, model=estimator, prediction="depth")
    np.testing.assert_allclose(as_depth, 1 - as_disparity, atol=1e-6)
    # Depth Anything (relative) outputs disparity: larger = nearer.
    np.testing.assert_array_equal(depth_map(photo, model=estimator), as_disparity)


class StubEstimator:
    """Stands in for a depth-estimation pipeline: a config and a fixed prediction."""

    def __init__(self, model_type, prediction):
        self.model = type("Model", (), {"config": type("Config", (), {"model_type": model_type})()})()
        self.prediction = prediction

    def __call__(self, image):
        import torch

        return {"predicted_depth": torch.as_tensor(self.prediction)}


def test_depth_map_reads_metric_depth_as_far():
    metric_depth = np.array([[1.0, 2.0], [3.0, 5.0]], dtype=np.float32)  # metres: the top-left pixel is nearest
    keep_map = depth_map(np.zeros((2, 2, 3), np.uint8), model=StubEstimator("zoedepth", metric_depth), near="keep")
    np.testing.assert_allclose(keep_map, [[1.0, 0.75], [0.5, 0.0]], atol=1e-7)


def test_depth_map_asks_when_it_cannot_tell_depth_from_disparity():
    with pytest.raises(ValueError, match="prediction="):
        depth_map(np.zeros((2, 2, 3), np.uint8), model=StubEstimator("unknown_model", np.zeros((2, 2))))


def test_depth_map_constant_prediction_gives_half_with_a_warning():
    with pytest.warns(UserWarning, match="constant"):
        keep_map = depth_map(np.zeros((2, 3, 3), np.uint8), model=StubEstimator("dpt", np.ones((2, 3))))
    np.testing.assert_array_equal(keep_map, np.full((2, 3), 0.5, np.float32))


def test_depth_map_names_a_model_it_cannot_load(photo):
    with pytest.raises(OSError, match="no-such-org/no-such-depth-model"):
        depth_map(photo, model="no-such-org/no-such-depth-model")


@pytest.mark.parametrize(
    "kwargs", [dict(near="far"), dict(prediction="metric"), dict(image=np.zeros((4, 4), np.uint8))]
)
def test_depth_map_rejects_bad_arguments(kwargs):
    arguments = dict(image=np.zeros((4, 4, 3), np.uint8), model=StubEstimator("dpt", np.eye(4))) | kwargs
    with pytest.raises(ValueError):
        depth_map(**arguments)


# ----------------------------------------------------------------------------------------------------------------------
# save_map
# ----------------------------------------------------------------------------------------------------------------------


def test_save_map_8_bit(tmp_path):
    keep_map = linear_gradient(300, 2)
    save_map(keep_map, tmp_path / "map.png")
    with Image.open(tmp_path / "map.png") as image:
        assert image.mode == "L" and image.size == (300, 2)
        np.testing.assert_array_equal(np.asarray(image), np.rint(keep_map * 255).astype(np.uint8))


def test_save_map_16_bit_round_trip(tmp_path):
    keep_map = np.random.default_rng(0).random((37, 41)).astype(np.float32)
    keep_map[0, :3] = [0.0, 1.0, 0.5]
    save_map(keep_map, tmp_path / "map16.png", bits=16)
    with Image.open(tmp_path / "map16.png") as image:
        assert image.mode in ("I;16", "I") and image.size == (41, 37)
        loaded = np.asarray(image).astype(np.float64) / 65535
    assert np.abs(loaded - keep_map).max() <= 0.5 / 65535 + 1e-9
    assert loaded[0, 0] == 0.0 and loaded[0, 1] == 1.0
    levels = np.random.default_rng(1).integers(0, 65536, size=(5, 6))  # values on the 16-bit grid come back exactly
    save_map(levels / 65535, tmp_path / "exact16.png", bits=16)
    with Image.open(tmp_path / "exact16.png") as image:
        np.testing.assert_array_equal(np.asarray(image), levels)


def test_save_map_accepts_a_torch_tensor(tmp_path):
    import torch

    save_map(torch.full((3, 4), 0.5), tmp_path / "tensor.png")
    with Image.open(tmp_path / "tensor.png") as image:
        assert np.all(np.asarray(image) == 128)


def test_save_map_refuses_to_overwrite(tmp_path):
    path = tmp_path / "map.png"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_map(np.zeros((2, 2)), path)
    assert path.read_bytes() == b"precious"
    save_map(np.ones((2, 2)), path, overwrite=True)
    with Image.open(path) as image:
        assert np.all(np.asarray(image) == 255)


@pytest.mark.parametrize("array, name, bits", [
    (np.zeros((2, 2, 3)), "map.png", 8), (np.full((2, 2), 1.01), "map.png", 8), (np.full((2, 2), -0.01), "map.png", 8),
    (np.full((2, 2), np.nan), "map.png", 8), (np.zeros((2, 2)), "map.png", 12), (np.zeros((2, 2)), "map.jpg", 8),
])
def test_save_map_rejects_bad_arguments(tmp_path, array, name, bits):
    with pytest.raises(ValueError):
        save_map(array, tmp_path / name, bits=bits)
    assert not (tmp_path / name).exists()


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def run_main(argv, capsys):
    """``python -m tools.maps ARGV`` in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        maps.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_cli_gradient_like_an_image(tmp_path, capsys):
    Image.new("RGB", (24, 10)).save(tmp_path / "photo.png")
    output = tmp_path / "gradient.png"
    assert run_main(["gradient", "--like", tmp_path / "photo.png", "--angle", "180", "--output", output], capsys) == (
        0, f"{output}\n", "")
    with Image.open(output) as image:
        expected = np.rint(linear_gradient(24, 10, 180) * 255).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(image), expected)


def test_cli_regions_and_feather_in_16_bit(tmp_path):
    labels = np.zeros((8, 8), np.uint8)
    labels[2:5, 2:5] = 3
    Image.fromarray(labels).save(tmp_path / "labels.png")
    Image.fromarray(labels * 85).save(tmp_path / "mask.png")  # 3 * 85 = 255: white = fill
    arguments = ["--labels", str(tmp_path / "labels.png"), "--strength", "0=0", "--strength", "3=0.5"]
    maps.run(["regions", *arguments, "--output", str(tmp_path / "regions.png"), "--bits", "16"])
    with Image.open(tmp_path / "regions.png") as image:
        np.testing.assert_array_equal(np.asarray(image), np.where(labels == 3, 32768, 65535))
    maps.run(["feather", "--mask", str(tmp_path / "mask.png"), "--feather-px", "3", "--output",
              str(tmp_path / "s.png")])
    with Image.open(tmp_path / "s.png") as image:
        expected = feathered_mask(labels == 3, 3)
        np.testing.assert_array_equal(np.asarray(image), np.rint(expected * 255).astype(np.uint8))


BAD_COMMANDS = {  # every one refused in one line, exit status 2, before anything is drawn or written
    "the output is the --like image": (["gradient", "--like", "photo.png", "--output", "photo.png", "--overwrite"],
                                       "--output photo.png is the --like file; inputs are never overwritten"),
    "the output is the mask": (["feather", "--mask", "mask.png", "--feather-px", "2", "--output", "mask.png",
                                "--overwrite"], "is the --mask file"),
    "the output is the labels": (["regions", "--labels", "mask.png", "--strength", "0=1", "--output", "mask.png",
                                  "--overwrite"], "is the --labels file"),
    "the output is the photo": (["depth", "--image", "photo.png", "--output", "photo.png", "--overwrite"],
                                "is the --image file"),
    "an existing output": (["radial", "--width", "8", "--height", "8", "--output", "taken.png"],
                           "taken.png already exists; pass --overwrite"),
    "a huge map": (["gradient", "--width", "100000", "--height", "100000", "--output", "g.png"],
                   "--width: must be a whole number from 1 to 8192, got '100000'"),
    "a huge mask": (["feather", "--mask", "wide.png", "--feather-px", "3", "--output", "f.png"],
                    "--mask wide.png: is 8193x1 pixels, more than 8192 on a side"),
    "a typo of a feather": (["feather", "--mask", "mask.png", "--feather-px", "1e9", "--output", "f.png"],
                            "--feather-px: must be a number from 0 to 100000, got '1e9'"),
    "no size": (["fan", "--width", "8", "--output", "f.png"], "give either --like IMAGE or both --width and --height"),
    "a missing mask": (["feather", "--mask", "nope.png", "--feather-px", "3", "--output", "f.png"],
                       "--mask nope.png: no such file"),
    "radii the wrong way round": (["radial", "--width", "8", "--height", "8", "--inner-radius", "5",
                                   "--outer-radius", "4", "--output", "r.png"], "--outer-radius (4.0) must be >= "
                                  "--inner-radius (5.0)"),
    "a label without strength": (["regions", "--labels", "labels.png", "--strength", "0=1", "--output", "r.png"],
                                 "Labels [3] appear in the label image but have no strength; --strength covers [0]"),
    "a strength beyond 1": (["regions", "--labels", "labels.png", "--strength", "3=2", "--output", "r.png"],
                            "--strength: must be LABEL=STRENGTH with a strength from 0 to 1"),
    "no maker": ([], "required: MAKER"),
    "not a png": (["fan", "--width", "8", "--height", "8", "--output", "fan.jpg"], "--output fan.jpg: give a .png"),
}


@pytest.mark.parametrize("argv, message", BAD_COMMANDS.values(), ids=BAD_COMMANDS.keys())
def test_cli_errors_are_one_line_and_leave_every_file_alone(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (24, 10), "red").save("photo.png")
    Image.new("L", (24, 10), 255).save("mask.png")
    Image.new("L", (8193, 1)).save("wide.png")
    labels = np.zeros((4, 4), np.uint8)
    labels[1:3, 1:3] = 3
    Image.fromarray(labels).save("labels.png")
    Path("taken.png").write_bytes(b"the user's file")
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    code, out, err = run_main(argv, capsys)
    assert (code, out) == (2, "") and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert message in err and "`" not in err, err
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_cli_overwrite_replaces_an_output(tmp_path, capsys):
    output = tmp_path / "taken.png"
    output.write_bytes(b"x")
    assert run_main(["radial", "--width", 8, "--height", 8, "--output", output, "--overwrite"], capsys)[0] == 0
    with Image.open(output) as image:
        np.testing.assert_array_equal(np.asarray(image), np.rint(radial(8, 8) * 255).astype(np.uint8))


def test_cli_help_shows_defaults_and_every_flag(capsys):
    for maker, flags in [("gradient", ["--angle", "--start", "--end", "--like"]), ("radial", ["--inner-radius"]),
                         ("fan", ["--sectors"]), ("feather", ["--grow-px"]), ("regions", ["--labels"]),
                         ("depth", ["--near", "--prediction", "--model"])]:
        code, out, _ = run_main([maker, "--help"], capsys)
        assert code == 0 and all(flag in out for flag in [*flags, "--output", "--bits", "--overwrite"]), maker
        assert "bits per pixel of the PNG" in out and "(default: 8)" in " ".join(out.split())


def test_cli_runs_as_a_module(tmp_path):
    output = tmp_path / "radial.png"
    command = [sys.executable, "-m", "tools.maps", "radial", "--width", "16", "--height", "12", "--output", str(output)]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True)
    with Image.open(output) as image:
        np.testing.assert_array_equal(np.asarray(image), np.rint(radial(16, 12) * 255).astype(np.uint8))


def test_cli_depth_names_a_wrong_model_folder_and_a_huge_image_gives_only_our_line(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    Image.new("1", (9500, 9500)).save(tmp_path / "huge.png")  # past Pillow's 89M-pixel warning, below its error
    for folder, index in [("pipe", "model_index.json"), ("other", "config.json")]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / index).write_text('{"_class_name": "StableDiffusionPipeline"}')
    for argv, status, message in [(["--model", tmp_path / "pipe"], 2, "here --model takes a transformers depth"),
                                  (["--model", tmp_path / "other"], 1, "Cannot load the depth model"),
                                  (["--image", tmp_path / "huge.png"], 2, "is 9500x9500 pixels, more than 8192")]:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            code, out, err = run_main(["depth", "--image", tmp_path / "photo.png", *argv, "--output",
                                       tmp_path / "d.png"], capsys)
        assert (code, out, len(err.splitlines()), warned) == (status, "", 1, []) and message in err, err
        assert "--model-type" not in err
