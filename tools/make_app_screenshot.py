"""Screenshot of the web app for the README, made by driving app.py in a headless Chromium.

    python -m tools.make_app_screenshot --tiny          # writes docs/screenshots/app.png
    python -m tools.make_app_screenshot --model path/to/folder --output app.png

It starts ``app.py --model MODEL --device cpu`` on a free port, uploads assets/input.jpg, paints a stroke on the map,
edits at a small working size with keep exact on, and saves the finished page. No weights are at hand here, so the
committed screenshot comes from the tiny random-weight SD model the tests build (``--tiny``): its result shows the
page, not the method; a real ``--model`` makes one that shows both. tests/test_app.py drives the page through the
same functions.

Needs Playwright for Python and a Chromium (Debian's ``chromium`` package: Playwright's own browser download is not
used).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # started as a script path: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tools import cli, results  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Without the networking flags Chromium keeps dialling out, which a closed network refuses slowly.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# Not docs/images, which holds only what tools.make_doc_images draws (tests/test_doc_images.py).
DEFAULT_OUTPUT = cli.REPO_ROOT / "docs" / "screenshots" / "app.png"


def browser_missing() -> str | None:
    """Why the app cannot be driven in a browser here, or None when gradio, Playwright and Chromium are installed."""
    for module, name in (("gradio", "gradio"), ("playwright", "Playwright for Python")):
        if importlib.util.find_spec(module) is None:  # found, not imported: importing gradio takes seconds
            return f"{name} is not installed (pip install -r requirements-app.txt)"
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM to its path)"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_app(model: Path | str, *extra: str, log: Path | None = None, timeout: float = 120,
                env: dict | None = None):
    """``app.py --model MODEL --device cpu`` on a free port, with ``env`` added to its environment, until the block
    ends; yields its URL."""
    port = free_port()
    log_file = open(log, "wb") if log else subprocess.DEVNULL
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", **(env or {})}
    process = subprocess.Popen([sys.executable, str(cli.REPO_ROOT / "app.py"), "--model", str(model), "--device",
                                "cpu", "--port", str(port), *extra], stdout=log_file, stderr=subprocess.STDOUT,
                               env=env, cwd=cli.REPO_ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited with status {process.returncode}"
                                   + (f"; its output: {Path(log).read_text()[-2000:]}" if log else ""))
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"app.py did not answer at {url} within {timeout:g} s") from None
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        if log:
            log_file.close()


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 1600):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, accept_downloads=True)
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def upload_image(page, path: Path) -> None:
    """Uploads ``path`` as the image to edit, in place of the example or any image uploaded before."""
    from playwright.sync_api import Error as PlaywrightError

    clear = page.locator("#image-file button[aria-label=Clear]")
    file_input = page.locator("#image-file input[type=file]")
    clear.or_(file_input).first.wait_for(state="attached")  # the page has loaded
    if clear.count():
        with contextlib.suppress(PlaywrightError):  # the button goes as Gradio drops a refused upload: nothing to clear
            clear.click(timeout=3000)
    file_input.set_input_files(str(path))


def wait_for_editor_image(page) -> None:
    """Waits until the map preview of a new upload arrives, and the editor has had a moment to draw it."""
    page.locator("#map-over img").wait_for()
    page.wait_for_timeout(1000)


def fetch_image(page, selector: str) -> Image.Image:
    """The image an ``<img>`` of the page shows, as the server sent it."""
    with urllib.request.urlopen(page.locator(selector).first.get_attribute("src")) as response:
        return Image.open(io.BytesIO(response.read()))


def paint_map(page, start: tuple[float, float], end: tuple[float, float], attempts: int = 3) -> np.ndarray:
    """Paints a stroke (see ``paint_stroke``) and returns the keep map the page previews once it shows the stroke.
    A stroke drawn while the editor still loads its image is lost with the empty canvas; it is drawn again."""
    for _ in range(attempts):
        paint_stroke(page, start, end)
        for _ in range(20):
            page.wait_for_timeout(500)
            if page.locator("#map-grey img").count():
                keep_map = np.asarray(fetch_image(page, "#map-grey img").convert("L"))
                if (keep_map < 255).any():
                    return keep_map
    raise RuntimeError("the painted stroke never reached the map preview")


def paint_stroke(page, start: tuple[float, float], end: tuple[float, float], moves: int = 12) -> None:
    """Drags the mouse over the map canvas from ``start`` to ``end``, given as fractions of the canvas box."""
    box = page.locator("#map-editor canvas").first.bounding_box()
    point = lambda fx, fy: (box["x"] + fx * box["width"], box["y"] + fy * box["height"])  # noqa: E731
    page.mouse.move(*point(*start))
    page.mouse.down()
    for k in range(1, moves + 1):
        page.mouse.move(*point(start[0] + (end[0] - start[0]) * k / moves, start[1] + (end[1] - start[1]) * k / moves))
    page.mouse.up()


def set_field(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    field.fill(str(value))
    field.press("Tab")  # Gradio reads a number field when it loses focus


def click_edit(page, button: str = "edit", timeout_ms: float = 60_000) -> str:
    """Clicks Edit (or fan, sweep), waits for the next numbered result, and returns its summary line."""
    summary = "() => (document.querySelector('#info').innerText.match(/Result (\\d+):.*/) || ['', '0'])"
    number = int(page.evaluate(summary)[1])
    page.locator(f"#{button}").click()
    page.wait_for_function(f"number => Number(({summary})()[1]) > number", arg=number, timeout=timeout_ms)
    return page.evaluate(summary)[0]


def build_tiny_model(folder: Path) -> Path:
    """The tests' tiny random-weight SD model, saved to ``folder``."""
    sys.path[:0] = [str(cli.REPO_ROOT), str(cli.REPO_ROOT / "tests")]
    from diffusers import StableDiffusionImg2ImgPipeline
    from tiny_models import build_pipeline, sd_components

    build_pipeline(StableDiffusionImg2ImgPipeline, sd_components()).save_pretrained(folder)
    return folder


def make_screenshot(model: Path | str, output: Path, working_size: int) -> Path:
    with tempfile.TemporaryDirectory() as scratch, running_app(model, log=Path(scratch) / "app.log") as url, \
            browser_page() as page:
        page.goto(url)
        set_field(page, "max-side", working_size)
        upload_image(page, cli.EXAMPLE_IMAGE)
        wait_for_editor_image(page)
        paint_map(page, (0.35, 0.3), (0.65, 0.45))
        set_field(page, "prompt", cli.EXAMPLE_PROMPT.read_text().strip())
        set_field(page, "steps", 20)
        page.locator("#keep-exact input").check()
        click_edit(page, timeout_ms=300_000)
        page.wait_for_timeout(1000)
        output.parent.mkdir(parents=True, exist_ok=True)
        shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    # 256 colours keep the page legible at a third of the size, and the repository small.
    return results.write_png(shot.quantize(256, method=Image.Quantize.MEDIANCUT), output, overwrite=True)


def run(argv: list[str] | None = None) -> None:
    parser = cli.Parser(prog="python -m tools.make_app_screenshot", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hub id or local diffusers folder of an SD 1.x/2.x model")
    source.add_argument("--tiny", action="store_true", help="the tests' tiny random-weight model (no weights needed)")
    parser.add_argument("--working-size", type=cli.whole_number(0, 2048), help="the longer side the image is "
                        "edited at (default: 512 with --model, 192 with --tiny: its attention is slow at large sizes)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="PNG to write (default: "
                        f"{cli.display(DEFAULT_OUTPUT)})")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if (why := browser_missing()) is not None:
        raise cli.CliError(why)
    with tempfile.TemporaryDirectory() as scratch:
        model = build_tiny_model(Path(scratch) / "sd") if args.tiny else args.model
        size = args.working_size if args.working_size is not None else 192 if args.tiny else 512
        print(cli.display(make_screenshot(model, args.output, size)))


if __name__ == "__main__":
    cli.main(run)
