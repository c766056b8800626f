"""Fixtures and helpers for offline CPU tests on tiny random-weight models (built in ``tiny_models.py``; tests import
them from here, and each components builder is a fixture of its name), and session fixtures (``sd_dir``, ...) that
save each stock pipeline once, for ``from_pretrained`` and ``run.py --model DIR``.
"""
import os

# Before any Hugging Face import: fail at once instead of retrying the network, and keep logs quiet.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Tiny models gain nothing from threads, and on a busy machine extra threads make them several times slower.
# The variable also reaches subprocesses (run.py tests), so both sides compute in the same order.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib
import io
import json
import subprocess
import sys
import tempfile

# diffusers copies a local custom pipeline to <HF_MODULES_CACHE>/diffusers_modules/local/<file name> before importing
# it, and every family's file is called diff_pipe.py: a private folder keeps test runs side by side from replacing
# each other's copy between the write and the import. Subprocesses inherit it.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="diffusers-modules-"))
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from diffusers import (
    DiffusionPipeline, IFImg2ImgPipeline, IFImg2ImgSuperResolutionPipeline, KandinskyV22Img2ImgPipeline,
    KandinskyV22PriorPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline,
)

from benchmarks.harness import count_unet_calls  # noqa: F401 - one counter for tests and benchmarks
from tests.tiny_models import (  # noqa: F401 - tests import the builders from here
    IF_STAGE1_SIZE, IF_STAGE2_SIZE, IMAGE_SIZE, SCHEDULERS, SEED, TEXT_HIDDEN_SIZE, build_pipeline, clip_text_model,
    clip_tokenizer, if_stage1_components, if_stage2_components, kandinsky_decoder_components,
    kandinsky_prior_components, make_scheduler, save_pipeline, save_stock, sd_components, sdxl_components,
    sdxl_refiner_components, seeded_generator, t5_tokenizer, test_image,
)

# Loading bars ("Loading pipeline components...") only clutter failure reports.
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported before this file


# Saving and loading


def saved_as_none(folder):
    """The components that a folder's model_index.json records as absent (``[null, null]``)."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return [name for name, value in index.items() if value == [None, None]]


def load_pipeline(folder, pipeline_class=DiffusionPipeline, **kwargs):
    """Load a saved folder offline, passing ``None`` for every component saved as absent: diffusers 0.42 reloads an
    IF stage II saved without ``watermarker`` only with ``watermarker=None`` given, as it is not an optional one."""
    absent = {name: None for name in saved_as_none(folder)}
    pipe = pipeline_class.from_pretrained(folder, **{**absent, **kwargs})
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Batched and single runs add the same float32 products in other orders (other kernel shapes). Sums of ~1e3 terms
# then differ by up to ~1e3 * 2**-24, about 1e-4 of their magnitude, far below what a map on the wrong item changes.
BATCH_RTOL = 1e-4


def assert_close_to_single_run(batched, alone):
    batched, alone = np.asarray(batched), np.asarray(alone)
    np.testing.assert_allclose(batched, alone, rtol=BATCH_RTOL, atol=BATCH_RTOL * np.abs(alone).max())


# Fixtures


@pytest.fixture(autouse=True)
def _forget_custom_pipeline_modules():
    """Drops the modules that ``custom_pipeline=...`` imported: diffusers imports every diff_pipe.py under one name,
    and a second file executed into the first one's module leaves two pipeline classes there, loading neither."""
    yield
    for name in [name for name in sys.modules if name.startswith("diffusers_modules.local.")]:
        del sys.modules[name]


@pytest.fixture
def generator():
    return seeded_generator()


@pytest.fixture
def image():
    return test_image()


def _fresh(builder):
    """A fixture of the builder's name: fresh components for each test, which may swap schedulers or move models."""
    return pytest.fixture(name=builder.__name__)(lambda: builder())


def _saved(name, pipeline_class, builder):
    """A session fixture ``<name>_dir``: the stock pipeline on the builder's components, saved once to a folder."""

    return pytest.fixture(scope="session", name=f"{name}_dir")(
        lambda tmp_path_factory: save_stock(pipeline_class, builder, tmp_path_factory.mktemp(name)))


for _builder in (sd_components, sdxl_components, kandinsky_prior_components, kandinsky_decoder_components,
                 if_stage1_components, if_stage2_components):
    globals()[f"_{_builder.__name__}"] = _fresh(_builder)


@pytest.fixture(name="sdxl_refiner_components")
def _sdxl_refiner_components(sdxl_components):
    # A test that asks for both gets a refiner sharing the base's VAE and second text encoder.
    return sdxl_refiner_components(sdxl_components)


for _name, _class, _builder in [
    ("sd", StableDiffusionImg2ImgPipeline, sd_components),
    ("sdxl_base", StableDiffusionXLImg2ImgPipeline, sdxl_components),
    ("sdxl_refiner", StableDiffusionXLImg2ImgPipeline, sdxl_refiner_components),
    ("kandinsky_prior", KandinskyV22PriorPipeline, kandinsky_prior_components),
    ("kandinsky_decoder", KandinskyV22Img2ImgPipeline, kandinsky_decoder_components),
    ("if_stage1", IFImg2ImgPipeline, if_stage1_components),
    ("if_stage2", IFImg2ImgSuperResolutionPipeline, if_stage2_components),
]:
    globals()[f"_{_name}_dir"] = _saved(_name, _class, _builder)


# Scripts

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_script(script, *args, cwd=None, timeout=300):
    """Runs a repository script (``"SD2/run.py"``) in a fresh Python, offline, and returns the finished process."""
    command = [sys.executable, str(REPO_ROOT / script), *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=cwd or REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def inputs(tmp_path):
    """A 64 px test image and a map whose left half changes fully, saved as files for run.py."""
    from tools.maps import save_map

    image, map_path = tmp_path / "photo.png", tmp_path / "map.png"
    test_image().save(image)
    keep_map = np.ones((64, 64), np.float32)
    keep_map[:, :32] = 0.0
    save_map(keep_map, map_path)
    return image, map_path


def run_in_process(script, *args, cwd=None):
    """Runs a model's run.py (``"SD2/run.py"``) through ``cli.main`` in this process, in ``cwd``, and returns a finished
    process as ``run_script`` does, without a subprocess's seconds of imports (real stderr needs ``run_script``)."""
    from tools import cli, loading

    module = loading.load_family(Path(script).parent.name)
    out, err, saved_argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [str(REPO_ROOT / script), *map(str, args)]
    try:
        with contextlib.chdir(cwd or REPO_ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main(module.run)
            except SystemExit as exit:
                status = exit.code
    finally:
        sys.argv = saved_argv
    return subprocess.CompletedProcess(sys.argv, status, out.getvalue(), err.getvalue())
