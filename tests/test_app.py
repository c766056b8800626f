"""app.py in a real browser: headless Chromium, driven by Playwright, against the tiny SD model on the CPU."""

import shlex
import socket

import numpy as np
import pytest
from conftest import run_in_process
from PIL import Image
from scipy import ndimage

from tests.tiny_models import sd_controlnet_components
from tools import make_app_screenshot as browser
from tools.maps import linear_gradient

needs_browser = pytest.mark.skipif(browser.browser_missing() is not None, reason=f"browser tests: "
                                   f"{browser.browser_missing()}")

SEED, STEPS = 7, 4


@pytest.fixture(scope="module")
def app_url(sd_dir, tmp_path_factory):
    log, temp = tmp_path_factory.mktemp("app") / "app.log", tmp_path_factory.mktemp("app-temp")
    with browser.running_app(sd_dir, log=log, env={"TMPDIR": str(temp)}) as url:
        yield url
    # Terminated, the app leaves nothing in the temp folder: neither its results nor Gradio's uploads.
    assert not list(temp.iterdir())


@pytest.fixture(scope="module")
def browser_tab(app_url):
    with browser.browser_page() as page:  # one Chromium for the module: starting one costs seconds
        yield page


@pytest.fixture
def page(browser_tab, app_url):
    browser_tab.goto(app_url)  # a fresh load is a fresh Gradio session
    return browser_tab


def smooth_image(width=128, height=96):
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def download(page, tmp_path, name):
    with page.expect_download() as started:
        page.locator("#download a").first.click()
    started.value.save_as(tmp_path / name)
    return Image.open(tmp_path / name)


def rerun(png, output, pixels, **values):
    """Whether the PNG's command, run as run.py with ``values`` (image=PATH, ...) for its own, gives ``pixels``, and
    whether run.py records that command word for word: the page's and run.py's have one builder and one format."""
    words = shlex.split(png.text["command"])
    for name, value in values.items():
        words[words.index(f"--{name}") + 1] = str(value)
    ran = run_in_process(words[1], *words[2:], "--output", output)
    assert ran.returncode == 0, ran.stderr
    return (np.array_equal(np.asarray(Image.open(output).convert("RGB")), pixels),
            Image.open(output).text["command"] == shlex.join(words))


@needs_browser
def test_bad_uploads_show_errors_then_edit_and_fan_in_the_browser(page, tmp_path):
    (text_file := tmp_path / "notes.txt").write_text("not an image\n")
    browser.upload_image(page, text_file)
    page.get_by_text("Invalid file type: notes.txt").wait_for()  # Gradio refuses it by its name
    (disguised := tmp_path / "notes.png").write_text("not an image either\n")
    browser.upload_image(page, disguised)
    page.get_by_text("image notes.png: not an image (Pillow cannot read this file)").wait_for()
    assert "Traceback" not in page.content()

    # The app goes on: the same page edits what is uploaded next.
    image_path = tmp_path / "input.png"
    smooth_image().save(image_path)
    for field, value in (("steps", STEPS), ("seed", SEED), ("prompt", "a red square")):
        browser.set_field(page, field, value)
    page.locator("#keep-exact input").check()

    browser.upload_image(page, image_path)
    browser.wait_for_editor_image(page)
    browser.paint_map(page, (0.45, 0.45), (0.55, 0.5))
    summary = browser.click_edit(page)
    assert f"{STEPS} denoising steps" in summary
    assert page.locator("#result img").count() >= 1  # the before/after slider holds the result

    # Pixels the stroke did not reach are the input's own bytes (keep exact); the stroke itself changed.
    keep_map = np.asarray(browser.fetch_image(page, "#map-grey img").convert("L"))  # the map the edit used
    painted = keep_map < 255
    assert 0 < painted.mean() < 0.8, "the stroke should cover part of the map, not all of it"
    result = download(page, tmp_path, "first.png")
    original, edited = np.asarray(Image.open(image_path)), np.asarray(result.convert("RGB"))
    assert edited.shape == original.shape
    far = ~ndimage.binary_dilation(painted, np.ones((5, 5)))  # more than 2 pixels from the stroke
    assert far.sum() > 500
    np.testing.assert_array_equal(edited[far], original[far])
    assert np.abs(edited[keep_map == 0].astype(int) - original[keep_map == 0]).max() > 0

    # The PNG holds the parameters, as run.py writes them.
    text = result.text
    assert (text["steps"], text["seed"], text["keep_exact"], text["prompt"]) == (str(STEPS), str(SEED), "True",
                                                                                  "a red square")
    assert (text["steps_run"], text["family"], text["tool"], text["map"]) == (str(STEPS), "sd2", "app", "painted")
    assert text["command"].startswith("python SD2/run.py --image input.png --map map.png")

    # The same seed gives the same image.
    browser.click_edit(page)
    np.testing.assert_array_equal(np.asarray(download(page, tmp_path, "second.png").convert("RGB")), edited)
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    assert (tmp_path / "app.png").stat().st_size > 10_000

    # The fan button runs tools.fan's Strength Fan: every strength from 0 to 1 in one edit.
    assert f"{STEPS} denoising steps" in browser.click_edit(page, "fan")
    fan_png = download(page, tmp_path, "fan.png")
    assert (fan_png.text["tool"], fan_png.text["sectors"], fan_png.text["map"]) == ("fan", "8",
                                                                                   "strength fan, 8 sectors")
    assert page.locator("#extra img").count() == 1  # the labelled fan


@needs_browser
def test_the_seed_typed_and_a_controlnet_reach_the_pipeline_and_the_png_command(page, tmp_path):
    image_path, map_path = tmp_path / "input.png", tmp_path / "gradient.tiff"
    smooth_image().save(image_path)
    Image.fromarray(linear_gradient(*smooth_image().size)).save(map_path)  # the page's gradient map, in float32
    page.locator("#map-source input[value=gradient]").check()
    for field, value in (("steps", STEPS), ("seed", SEED), ("crop-margin", 8)):
        browser.set_field(page, field, value)
    browser.upload_image(page, image_path)
    browser.wait_for_editor_image(page)
    browser.click_edit(page)
    result = download(page, tmp_path, "seeded.png")
    edited, text = np.asarray(result.convert("RGB")), result.text
    assert (text["seed"], text["map"], text["crop_margin"]) == (str(SEED), "gradient 0°", "8")

    # The PNG's command, on these files, gives the page's image with the seed typed, and another without it.
    files = {"image": image_path, "map": map_path}
    assert rerun(result, tmp_path / "again.png", edited, **files, seed=SEED) == (True, True)
    assert rerun(result, tmp_path / "seed-0.png", edited, **files, seed=0)[0] is False

    # So does a ControlNet's edit, a folder typed on the page; with a negative prompt that reads like a flag too.
    sd_controlnet_components()["controlnet"].save_pretrained(controlnet := tmp_path / "controlnet")
    for field, value in (("controlnet", controlnet), ("controlnet-scale", 0.5), ("negative-prompt", "-blurry")):
        browser.set_field(page, field, value)
    browser.click_edit(page)
    result = download(page, tmp_path, "controlnet.png")
    assert (result.text["controlnet"], result.text["control"]) == (f'["{controlnet}"]', '["canny"]')
    assert rerun(result, tmp_path / "controlnet-again.png", np.asarray(result.convert("RGB")), **files) == (True, True)


def test_messages_instead_of_tracebacks():
    app = pytest.importorskip("app")
    for error, shown in ((RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "out of memory: try"),
                         (app.cli.CliError("no image: upload the image to edit first"), "no image: upload"),
                         (ValueError("`map` must have values in [0, 1]"), "`map` must have values")):
        with pytest.raises(app.gr.Error, match=shown), app.page_errors():
            raise error
    with pytest.raises(RuntimeError, match="a bug"), app.page_errors():  # anything else is a bug: it stays one
        raise RuntimeError("a bug")


def test_painted_layers_make_a_keep_map():
    app = pytest.importorskip("app")
    layer = np.zeros((4, 6, 4), dtype=np.uint8)
    layer[1, 2] = (0, 0, 0, 255)  # black: change fully
    layer[2, 3] = (128, 128, 128, 255)  # grey
    layer[3, 4] = (0, 0, 0, 128)  # half-covered black, as at a stroke's soft edge
    keep = np.asarray(app.painted_map([Image.fromarray(layer, "RGBA")], (6, 4)))
    expected = np.ones((4, 6), dtype=np.float32)
    expected[1, 2], expected[2, 3], expected[3, 4] = 0, 128 / 255, 1 - 128 / 255
    np.testing.assert_allclose(keep, expected, atol=1e-6)
    mask = np.asarray(app.painted_mask([Image.fromarray(layer, "RGBA")], (6, 4)))
    np.testing.assert_allclose(mask, layer[..., 3] / 255, atol=1e-6)


def test_mistakes_read_as_the_page_speaks(tmp_path, capsys):
    app = pytest.importorskip("app")
    with pytest.raises(app.gr.Error, match="or type a folder's path in the Model box to") as raised, app.page_errors():
        raise app.cli.CliError("cannot load model a/b: it is not cached, or pass --model PATH to load a folder")
    assert not raised.value.print_exception and capsys.readouterr().err.count("\n") == 1  # one line, no traceback
    (tmp_path / "notes.png").write_text("not an image")  # a map upload is named as the user named it
    with pytest.raises(app.cli.CliError, match=r"^map notes.png: not an image \(Pillow"):
        app.make_map(smooth_image(), "upload", None, str(tmp_path / "notes.png"), 0, 0, 1, 0, 0)
    unet = app.argparse.Namespace(config=app.argparse.Namespace(block_out_channels=(32, 64)))
    pipe = app.argparse.Namespace(vae_scale_factor=2, unet=unet)  # the family's own check, not torch's text
    with pytest.raises(app.gr.Error) as raised, app.page_errors():
        app.loading.load_family("sd2").edit(pipe, None, images=[Image.new("RGB", (2, 2))], maps=[None], prompts=[""],
                                            negative_prompts=[""], seeds=[0])
    assert raised.value.message == ("image: the image is 2x2 pixels, smaller than 4x4, the smallest this model edits "
                                    "(2 pixels a latent cell, and a UNet of 2 levels that halves it at each but the "
                                    "last); upload a larger image, or raise the working size")
    with pytest.raises(app.cli.CliError, match=r"^negative prompt: character 2 is a lone surrogate \(U\+D800\)"):
        app.cli.check_prompts("a cat", "a\ud800", ("prompt", "negative prompt"))
    with socket.create_server(("127.0.0.1", 0)) as held:  # refused before the model loads, which would fail here
        port = held.getsockname()[1]
        with pytest.raises(app.cli.CliError, match=f"--port {port} on 127.0.0.1 is in use"):
            app.run(["--model", str(tmp_path / "missing"), "--device", "cpu", "--port", str(port)])


def test_the_page_a_newcomer_sees(tmp_path):
    app = pytest.importorskip("app")
    flags = ["--device", "cpu", "--crop-margin", "4", "--controlnet", "a/b", "--control", "canny"]
    args = app.family_args("sd2", flags)
    with app.app_folder() as folder:
        blocks = app.build_app(app.Models("sd2", args, fixed=True), folder).blocks.values()
        assert (folder / "uploads").is_dir()  # Gradio's copies of files go into the app's own folder
    assert not folder.exists()
    fields = {block.elem_id: block for block in blocks if block.elem_id}
    texts = " ".join(str(getattr(block, "label", None) or getattr(block, "value", "")) for block in blocks)
    assert "Running on the CPU" in texts and "white = keep" in texts
    assert not [word for word in ("red", "= strength", "strength 1") if word in texts]  # one language for the map
    assert (fields["steps"].value, fields["max-side"].value) == (app.CPU_STEPS, app.CPU_SIDE)
    assert fields["prompt"].value == app.cli.EXAMPLE_PROMPT.read_text().strip()
    assert fields["map-editor"].value["background"]  # the example image, ready to paint on
    assert (fields["crop-margin"].value, fields["controlnet"].value, fields["control"].value) == (4, "a/b", "canny")
    assert not fields["controlnet"].interactive  # served beyond this machine: only the launch's models load
    with pytest.raises(app.cli.CliError, match="only with the model it was started with"):
        app.Models("sd2", args, fixed=True).get("sd2", app.family_args("sd2", ["--model", "x/y"]))
