"""What every model folder's run.py promises, checked for each one on its tiny model saved to a folder.

``FAMILIES`` holds one entry per run.py: the flags that load its tiny model(s) and keep runs short, the step counts
its schedule gives, and its particular flags, PNG text, help text and refusals. A new family's run.py is checked by
adding one entry. What only one family does stays in its own file (tests/test_run_sdxl.py, ...).

The runs go through ``cli.main`` in this process (conftest's ``run_in_process``): a subprocess costs seconds of
imports and tells nothing more, except where a test looks at a real process's stdout and stderr, or starts run.py
as a script.
"""

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
from conftest import REPO_ROOT, run_in_process, run_script
from edit_models import save_flux2_klein
from flow_models import save_flux, save_sd3
from flow_models2 import save_chroma, save_qwenimage, save_zimage
from PIL import Image

from tools import loading
from tools.maps import save_map

PROMPT = "a red apple"
CPU_WARNING = "warning: running on the CPU in fp32; this takes minutes"  # said once in a process, so maybe here


@dataclass(frozen=True)
class Family:
    folder: str  # the model folder that holds run.py
    models: list  # flags that load its tiny model(s) and keep runs short; "{name}" is the saved folder of that name
    takes: str  # what its --model takes, as loading.FAMILIES words it
    other_checkpoint: str = "sd_dir"  # a saved folder of another family, which --model must refuse
    half: tuple = ("10", 5)  # --steps given, and the denoising steps that run at --strength 0.5
    full_steps: int = 4  # the denoising steps of a run at --steps 4 and --strength 1
    run_flags: list = field(default_factory=list)  # its particular flags, given in the run that checks the PNG text
    text: dict = field(default_factory=dict)  # the PNG text those flags and `models` give; "{name}" as in models
    stage_files: tuple = ()  # what it writes beside --output: <output stem>-<name>.png
    grid: int | None = None  # the multiple of pixels its working size is rounded down to, where it rounds
    from_tiny: tuple | str = (64, 64)  # what a 2x2 image gives: the output's (width, height), or its refusal
    flags: tuple = ()  # its own flags, which --help must document
    help_says: tuple = ()  # what its --help must say (argparse's line breaks ignored)
    help_never_says: tuple = ()
    bad_inputs: list = field(default_factory=list)  # its own refusals: (case, extra flags, exit status, message)

    @property
    def name(self):
        return self.folder.lower()


CONDITIONING_FLAGS = ("--controlnet", "--control-image", "--control", "--controlnet-scale", "--depth-model",
                      "--inpaint-model")
TOO_SMALL = ("--image: the image is 2x2 pixels, smaller than {0}x{0}, the smallest this model edits ({1}); give an "
             "image at least {0} pixels on each side")
FLOW_SAMPLER = ("an SD sampler", ["--scheduler", "euler"], 2, "leave --scheduler default")


def flow(folder, takes, **particular):
    """A flow-matching family: one saved folder, `ceil(T * s)` steps (5 * 0.5 gives 3, where SD runs 2), a working
    size rounded down to 16 pixels (the VAE's 8 times 2x2 patches), and only its own sampler."""
    return Family(folder, ["--model", f"{{{folder.lower()}_dir}}"], takes, half=("5", 3), grid=16,
                  from_tiny=TOO_SMALL.format(16, "the VAE's 8 pixels a latent, in 2x2 patches"),
                  bad_inputs=[FLOW_SAMPLER], **particular)


FAMILIES = [
    Family(
        "SD2", ["--model", "{sd_dir}"], "an SD 1.x/2.x checkpoint", other_checkpoint="sdxl_base_dir",
        # the tiny UNet's two levels need 2 x 2 latent cells of 2 px: a 2 px image made GroupNorm fail
        from_tiny=TOO_SMALL.format(4, "2 pixels a latent cell, and a UNet of 2 levels that halves it at each but the "
                                   "last"),
        flags=CONDITIONING_FLAGS,
    ),
    Family(
        "SDXL", ["--model", "{sdxl_base_dir}", "--refiner", "{sdxl_refiner_dir}", "--width", "64", "--height", "64"],
        "an SDXL checkpoint",
        # 10 steps at strength 0.5: steps 5 to 7 in the base, 8 and 9 in the refiner, which starts at 0.8.
        text={"refiner": "{sdxl_refiner_dir}", "refiner_start": "0.8", "width": "64", "height": "64",
              "guidance_scale": "17.5"},
        flags=(*CONDITIONING_FLAGS, "--refiner", "--no-refiner", "--refiner-start", "--width", "--height"),
        help_says=("default: 17.5", "default: 100"),
        bad_inputs=[
            ("missing refiner folder", ["--refiner", "{tmp}/no-refiner-here"], 2, "--refiner"),
            ("hub refiner offline", ["--refiner", "someone/not-cached-refiner"], 1, "--refiner PATH"),
            ("height not a multiple of 8", ["--height", "100"], 2, "--height: must be a multiple of 8"),
            ("width not a number", ["--width", "wide"], 2, "--width: must be a multiple of 8"),
            ("refiner start out of range", ["--refiner-start", "1"], 2, "--refiner-start"),
        ],
    ),
    Family(
        "Kandinsky", ["--prior", "{kandinsky_prior_dir}", "--prior-steps", "2", "--model", "{kandinsky_decoder_dir}",
                      "--height", "64", "--width", "64"],
        "a Kandinsky 2.2 checkpoint",
        run_flags=["--image-weight", "0.3"],
        text={"prior": "{kandinsky_prior_dir}", "prior_steps": "2", "image_weight": "0.3", "height": "64",
              "width": "64"},
        flags=("--prior", "--prior-steps", "--prior-guidance-scale", "--image-weight", "--height", "--width"),
        bad_inputs=[
            ("missing prior folder", ["--prior", "{tmp}/no/prior/here"], 2, "--prior"),
            ("hub prior offline", ["--prior", "someone/not-cached-prior"], 1, "--prior PATH"),
            ("prior and decoder swapped", ["--prior", "{kandinsky_decoder_dir}", "--model", "{kandinsky_prior_dir}"], 2,
             "a Kandinsky 2.2 checkpoint (KandinskyV22Img2ImgPipeline), for Kandinsky/run.py; here --prior takes a "
             "Kandinsky 2.2 prior"),
            ("height off the grid", ["--height", "100"], 2, "--height"),
        ],
    ),
    Family(
        "IF", ["--model", "{if_stage1_dir}", "--stage2-model", "{if_stage2_dir}", "--stages", "2",
               "--stage2-steps", "4"],
        "a DeepFloyd IF checkpoint",
        half=("10", 7),  # stage I 10 * 0.5, stage II 4 * 0.5
        full_steps=8,  # stage I 4, stage II 4
        text={"stages": "2", "stage2_model": "{if_stage2_dir}", "stage2_steps": "4"},
        stage_files=("stage1",),
        flags=("--no-offload", "--stages", "--stage2-model", "--stage2-steps", "--stage2-guidance-scale",
               "--stage2-noise-level", "--stage3-model", "--stage3-steps", "--stage3-guidance-scale",
               "--stage3-noise-level"),
        help_says=("accept the licence",),
        bad_inputs=[
            ("stage II steps", ["--stage2-steps", "0"], 2, "--stage2-steps"),
            ("stage II guidance", ["--stage2-guidance-scale", "-1"], 2, "--stage2-guidance-scale"),
            ("stage III noise level", ["--stage3-noise-level", "351"], 2, "--stage3-noise-level"),
            ("stages", ["--stages", "4"], 2, "--stages"),
            ("sampler IF cannot use", ["--scheduler", "euler"], 2, "--scheduler"),
            ("offload on the cpu", ["--offload"], 2, "--offload"),
            ("stage II hub model offline", ["--stage2-model", "someone/not-cached-sr"], 1, "--stage2-model PATH"),
            ("stage III hub model offline", ["--stages", "3", "--stage3-model", "someone/not-cached-x4"], 1,
             "--stage3-model PATH"),
        ],
    ),
    flow("SD3", "an SD3 checkpoint"),
    flow("Flux", "a Flux checkpoint", flags=("--true-cfg-scale",),
         help_says=("gated", "distilled guidance, an input of the transformer"),
         help_never_says=("1 or less turns it off",)),
    flow("Chroma", "a Chroma checkpoint", help_says=("lodestones/Chroma1-HD",), help_never_says=("--true-cfg-scale",)),
    flow("QwenImage", "a Qwen-Image checkpoint", run_flags=["--guidance-scale", "0"], text={"guidance_scale": "0.0"},
         help_says=("Qwen/Qwen-Image", "true_cfg_scale", "guidance with --negative-prompt, two transformer passes "
                    "per step")),
    flow("Flux2", "a FLUX.2 [klein] checkpoint", flags=("--reference",),
         help_says=("black-forest-labs/FLUX.2-klein-base-9B", "(default: 8)", "instead of stock's empty one")),
    flow("ZImage", "a Z-Image checkpoint",
         help_says=("Tongyi-MAI/Z-Image-Turbo", "(--guidance-scale 0)", "(default: 8)", "0 turns it off"),
         help_never_says=("1 or less turns it off",)),
]
IDS = [family.name for family in FAMILIES]
# run.py files that edit videos, checked in their own file: the contract above writes and reads PNGs.
VIDEO_FAMILIES = {"wan": "tests/test_run_wan.py"}

# What every run.py refuses in one line: (case, extra flags, exit status, message). "{image}", "{map}" and "{tmp}"
# stand for the test's image, map and temporary folder.
COMMON_BAD_INPUTS = [
    ("missing image", ["--image", "nowhere.png"], 2, "--image nowhere.png: no such file"),
    ("missing map", ["--map", "nowhere.png"], 2, "--map nowhere.png: no such file"),
    ("output is the image", ["--output", "{image}", "--overwrite"], 2, "is the --image file"),
    ("fp16 on the cpu", ["--dtype", "fp16"], 2, "--dtype fp32"),
    ("steps out of range", ["--steps", "0"], 2, "--steps"),
    ("strength out of range", ["--strength", "1.5"], 2, "--strength"),
    ("map and mask", ["--mask", "{map}"], 2, "--map and --mask"),
    ("feather without a mask", ["--feather", "8"], 2, "--mask PATH"),
    ("hub model offline", ["--model", "someone/not-cached-model"], 1, "--model PATH"),
    # `$'caf\xe9'` reaches Python as a lone surrogate, which the tokenizers refused with a traceback
    ("prompt not UTF-8", ["--prompt", "caf\udce9"], 2, "--prompt: character 4 is the byte 0xE9, which is not UTF-8"),
    ("negative prompt not UTF-8", ["--negative-prompt", "\ud800"], 2, "--negative-prompt: character 1 is a lone"),
    ("NaN", ["--guidance-scale", "nan"], 2, "got 'nan'; NaN and infinity are not numbers it takes"),
]

COMMON_FLAGS = ("--model", "--image", "--map", "--invert-map", "--mask", "--feather", "--grow", "--prompt",
                "--negative-prompt", "--steps", "--guidance-scale", "--strength", "--seed", "--scheduler",
                "--keep-exact", "--crop-margin", "--crop-upscale", "--device", "--dtype", "--offload", "--output",
                "--overwrite", "--compare")

SAVERS = {"sd3_dir": save_sd3, "flux_dir": save_flux, "chroma_dir": save_chroma, "qwenimage_dir": save_qwenimage,
          "zimage_dir": save_zimage, "flux2_dir": save_flux2_klein}


@pytest.fixture(scope="module")
def saved_flow_models(tmp_path_factory):
    """The flow families' tiny models, each saved the first time a test asks for it."""
    folders = {}

    def folder(name):
        if name not in folders:
            folders[name] = SAVERS[name](tmp_path_factory.mktemp(name))
        return folders[name]

    return folder


@pytest.fixture
def folders(request, saved_flow_models):
    """``folders(name)``: the saved model folder of that name (a conftest fixture, or a flow model)."""
    return lambda name: saved_flow_models(name) if name in SAVERS else request.getfixturevalue(name)


def filled(values, folders, **names):
    """``values`` with every "{name}" replaced: by ``names``, else by the saved model folder of that name."""
    names = {key: str(value) for key, value in names.items()}

    def fill(text):
        return re.sub(r"\{(\w+)\}", lambda match: names.get(match[1]) or str(folders(match[1])), str(text))

    return {key: fill(value) for key, value in values.items()} if isinstance(values, dict) else [
        fill(value) for value in values]


@pytest.fixture
def run(folders, tmp_path):
    """``run(family, *flags)``: its run.py on its tiny model(s), on the CPU, in this process and ``tmp_path``; no
    library warning or log line may reach stderr (README), where only progress bars and our lines belong."""
    def run(family, *flags):
        models, said, handler = filled(family.models, folders), [], logging.Handler()
        handler.emit = lambda record: said.append(record.getMessage())
        loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")  # but for what Python hides outside __main__:
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            for logger in loggers:
                logger.addHandler(handler)
            try:
                ran = run_in_process(f"{family.folder}/run.py", *models, "--device", "cpu", *flags, cwd=tmp_path)
            finally:
                for logger in loggers:
                    logger.removeHandler(handler)
        said += [f"{warning.category.__name__}: {warning.message}" for warning in warned]
        assert [text for text in said if "CLIPImageProcessorPil" not in text] == []  # the tiny prior's own processor
        return ran
    return run


def written(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), dict(image.text), image.format


def error_lines(ran):
    return [line for line in ran.stderr.splitlines() if line.startswith("error:")]


def test_every_run_py_has_an_entry():
    assert sorted(family.name for family in FAMILIES) == sorted(set(loading.families()) - set(VIDEO_FAMILIES))
    assert all((REPO_ROOT / test).is_file() for test in VIDEO_FAMILIES.values())


# ---------------------------------------------------------------------------------------------------------------
# A whole run


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_run_writes_a_png_with_its_parameters_and_keeps_exact_where_the_map_is_white(family, run, folders, inputs,
                                                                                     tmp_path):
    image, map_path = inputs  # the left half changes, the right half is kept
    output = tmp_path / "edit.png"
    steps, steps_run = family.half
    flags = ["--image", image, "--map", map_path, "--prompt", PROMPT, "--negative-prompt", "blurry", "--steps", steps,
             "--strength", "0.5", "--seed", "7", "--keep-exact", *family.run_flags, "--output", output, "--compare"]
    ran = run(family, *flags)
    assert ran.returncode == 0, ran.stderr
    stage_files = [tmp_path / f"edit-{name}.png" for name in family.stage_files]
    lines = ran.stdout.splitlines()  # paths as given, and the last line's relative to the working folder
    assert lines[:-1] == [f"stage {n}: {path}" for n, path in enumerate(stage_files, start=1)], ran.stdout
    assert re.fullmatch(rf"edit\.png \(\d+\.\ds, {steps_run} denoising steps\); comparison: edit-compare\.png",
                        lines[-1]), ran.stdout
    assert set(not_progress_bars(ran.stderr)) <= {CPU_WARNING}, ran.stderr
    assert sorted(tmp_path.glob("edit*.png")) == sorted([output, tmp_path / "edit-compare.png", *stage_files])

    edited, text, kind = written(output)
    original = np.asarray(Image.open(image).convert("RGB"))
    assert kind == "PNG" and edited.shape == (64, 64, 3)
    # --keep-exact: the kept right half is the input's own bytes; the left half (strength 0.5) changed.
    assert np.array_equal(edited[:, 32:], original[:, 32:])
    assert np.abs(edited[:, :32].astype(int) - original[:, :32]).mean() > 5
    models = filled(family.models, folders)
    expected = {"prompt": PROMPT, "negative_prompt": "blurry", "model": models[models.index("--model") + 1],
                "image": str(image), "map": str(map_path), "invert_map": "False", "strength": "0.5",
                "keep_exact": "True", "steps": steps, "steps_run": str(steps_run), "seed": "7", "device": "cpu",
                "dtype": "fp32", "Software": "differential-diffusion", **filled(family.text, folders)}
    assert {key: text.get(key) for key in expected} == expected
    parser = loading.load_family(family.name).build_parser()  # the command holds every flag but where to write
    assert vars(parser.parse_args(shlex.split(text["command"])[2:])) == {**vars(parser.parse_args(
        [*models, "--device", "cpu", *map(str, flags)])), "output": None, "compare": False}
    with Image.open(tmp_path / "edit-compare.png") as strip:
        assert strip.size == (3 * 64, 64)


def test_a_run_as_a_script_prints_one_line_and_no_library_warning_and_an_error_alone(sd_dir, inputs, tmp_path):
    """The runs in a real process, whose stdout and stderr nothing in this process stands between."""
    image, map_path = inputs
    output = tmp_path / "edit.png"
    result = run_script("SD2/run.py", "--model", sd_dir, "--device", "cpu", "--image", image, "--map", map_path,
                        "--prompt", PROMPT, "--steps", "4", "--output", output)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"{re.escape(str(output))} \(\d+\.\ds, 4 denoising steps\)\n", result.stdout)
    # stderr: diffusers' progress bars, and the one line the design asks for on the CPU; no library warning (#11)
    assert not_progress_bars(result.stderr) == [CPU_WARNING]
    assert written(output)[0].shape == (64, 64, 3)
    # An error is the only line on the real stderr.
    result = run_script("SD2/run.py", "--model", sd_dir, "--device", "cpu", "--image", tmp_path / "nowhere.png",
                        "--map", map_path, "--prompt", "x", "--output", tmp_path / "out.png")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: --image {tmp_path / 'nowhere.png'}: no such file\n"
    assert not (tmp_path / "out.png").exists()


def not_progress_bars(stderr):
    """The pieces of ``stderr`` that are not tqdm progress bars (``Loading weights: 100%|...| 36/36 [...]``)."""
    pieces = re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr))  # bars redraw with \r and ANSI codes
    return [piece for piece in pieces if piece.strip() and not re.match(r"^[\w .]*:?\s*\d+%\|.*\| \d+/\d+ \[", piece)]


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_mask_fills_its_region_and_keeps_everything_beyond_the_feather(family, run, inputs, tmp_path):
    image, _ = inputs
    mask, output, hole = tmp_path / "hole.png", tmp_path / "filled.png", np.zeros((64, 64), np.uint8)
    hole[16:40, 16:40] = 255  # the inpainting mask: white is the region to fill
    Image.fromarray(hole).save(mask)
    ran = run(family, "--image", image, "--mask", mask, "--feather", "8", "--grow", "2", "--keep-exact", "--prompt",
              PROMPT, "--steps", "4", "--output", output)
    assert ran.returncode == 0, ran.stderr
    # the region is changed fully: the whole schedule runs
    assert f" {family.full_steps} denoising steps)" in ran.stdout.splitlines()[-1]
    edited, text, _ = written(output)
    original = np.asarray(Image.open(image).convert("RGB"))
    assert (text["mask"], text["feather"], text["grow"], "map" in text) == (str(mask), "8.0", "2.0", False)
    # The region grown by 2 px and feathered over 8 px ends 10 px from the square: beyond it, the input's bytes.
    beyond = np.ones((64, 64), bool)
    beyond[16 - 10 : 40 + 10, 16 - 10 : 40 + 10] = False
    assert np.array_equal(edited[beyond], original[beyond])
    assert np.abs(edited[16:40, 16:40].astype(int) - original[16:40, 16:40]).mean() > 5


# ---------------------------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_a_map_of_another_shape_is_stretched_and_a_tiny_image_gives_an_output_or_one_line(family, run, inputs,
                                                                                               tmp_path):
    image, map_path = inputs
    wide_map, output = tmp_path / "wide.png", tmp_path / "out.png"
    save_map(np.zeros((32, 64), np.float32), wide_map)
    ran = run(family, "--image", image, "--map", wide_map, "--prompt", "x", "--steps", "2", "--output", output)
    assert ran.returncode == 0, ran.stderr
    warnings = [line for line in ran.stderr.splitlines() if "stretched to fit" in line]
    assert warnings == ["warning: the map (64x32) has another shape than the image (64x64); it is stretched to fit"]
    assert written(output)[0].shape == (64, 64, 3)
    # A 2x2 image: refused where it is smaller than the model's smallest size, else scaled up to its --width and
    # --height (or its stage's size).
    Image.new("RGB", (2, 2)).save(tmp_path / "dot.png")
    ran = run(family, "--image", tmp_path / "dot.png", "--map", map_path, "--prompt", "x", "--steps", "2", "--output",
              tmp_path / "dot-out.png")
    assert "Traceback" not in ran.stderr
    if isinstance(family.from_tiny, str):
        assert ran.returncode == 2 and error_lines(ran) == [f"error: {family.from_tiny}"]
        assert not (tmp_path / "dot-out.png").exists()
    else:
        assert ran.returncode == 0 and error_lines(ran) == [], ran.stderr
        assert written(tmp_path / "dot-out.png")[0].shape == (*family.from_tiny[::-1], 3)


@pytest.mark.parametrize("family", [family for family in FAMILIES if family.grid], ids=lambda family: family.name)
def test_a_size_off_the_model_grid_is_rounded_down_with_its_map(family, run, tmp_path):
    # 64 x 79 rounds to 64 x 64: the map must be resized with the image, or their aspects would differ by 2 latents
    # (Z-Image does not resize to a size it is given, so its run.py resizes image and map itself).
    image, map_path, output = tmp_path / "tall.png", tmp_path / "tall-map.png", tmp_path / "out.png"
    Image.fromarray(np.full((79, 64, 3), 128, np.uint8)).save(image)
    save_map(np.zeros((79, 64), np.float32), map_path)
    ran = run(family, "--image", image, "--map", map_path, "--prompt", "x", "--steps", "2", "--output", output)
    assert ran.returncode == 0, ran.stderr
    assert written(output)[0].shape == (79 // family.grid * family.grid, 64, 3)


# ---------------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("family, case, extra, status, message", [
    pytest.param(family, *case, id=f"{family.name}-{case[0]}")
    for family in FAMILIES for case in [*COMMON_BAD_INPUTS, *family.bad_inputs]
])
def test_bad_input_gives_one_line_and_leaves_inputs_untouched(family, case, extra, status, message, run, folders,
                                                              inputs, tmp_path):
    image, map_path = inputs
    before = {path: path.read_bytes() for path in inputs}
    extra = filled(extra, folders, image=image, map=map_path, tmp=tmp_path)
    if "--output" not in extra:
        extra += ["--output", tmp_path / "out.png"]
    ran = run(family, "--image", image, "--map", map_path, "--prompt", "x", "--steps", "2", *extra)
    assert (ran.returncode, ran.stdout) == (status, ""), ran.stderr
    assert len(error_lines(ran)) == 1 and message in error_lines(ran)[0], ran.stderr
    assert set(ran.stderr.splitlines()) - set(error_lines(ran)) <= {CPU_WARNING}, ran.stderr
    assert {path: path.read_bytes() for path in inputs} == before
    assert not list(tmp_path.glob("out*.png"))


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_another_familys_checkpoint_and_an_existing_output_are_refused_in_one_line(family, run, folders, inputs,
                                                                                   tmp_path):
    image, map_path = inputs
    other, taken = folders(family.other_checkpoint), tmp_path / "edit.png"
    ran = run(family, "--model", other, "--image", image, "--map", map_path, "--prompt", "x", "--steps", "2",
              "--output", tmp_path / "out.png")
    what, where = {"sd_dir": ("an SD 1.x/2.x checkpoint (StableDiffusionImg2ImgPipeline)", "SD2/run.py"),
                   "sdxl_base_dir": ("an SDXL checkpoint (StableDiffusionXLImg2ImgPipeline)", "SDXL/run.py")}[
        family.other_checkpoint]
    assert (ran.returncode, ran.stdout) == (2, ""), ran.stderr
    assert ran.stderr.splitlines() == [f"error: --model {other}: {what}, for {where}; here --model takes "
                                       f"{family.takes}"]
    assert not list(tmp_path.glob("out*.png"))
    # An existing output is never overwritten.
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(taken)
    before = taken.read_bytes()
    ran = run(family, "--image", image, "--map", map_path, "--prompt", "x", "--steps", "2", "--output", taken)
    assert ran.returncode == 2 and error_lines(ran) == [
        "error: edit.png already exists; pass --overwrite to replace it, or another --output"]
    assert taken.read_bytes() == before and sorted(tmp_path.glob("edit*")) == [taken]


# ---------------------------------------------------------------------------------------------------------------
# Help


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_help_documents_every_flag_and_starts_as_a_script_from_any_folder(family, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(REPO_ROOT / family.folder / "run.py"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    words = done.stdout.split()
    spaced, joined = " ".join(words), "".join(words)  # argparse wraps lines, at spaces and at hyphens
    parser = loading.load_family(family.name).build_parser()
    every_flag = {flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")}
    assert {*COMMON_FLAGS, *family.flags} <= every_flag  # none went missing
    assert all(re.search(rf"{flag}\b", done.stdout) for flag in every_flag), sorted(every_flag)
    assert all(action.help for action in parser._actions), [action.dest for action in parser._actions
                                                            if not action.help]
    assert "white (1) keeps a pixel" in spaced  # the map convention
    for text in family.help_says:
        assert " ".join(text.split()) in spaced or "".join(text.split()) in joined, text
    for text in family.help_never_says:
        assert text not in spaced, text


def test_a_sweep_on_a_flow_family_recommends_no_scheduler_it_refuses(saved_flow_models, inputs, tmp_path, capsys):
    from tools import fan

    with pytest.raises(SystemExit) as done:
        fan.main(["--family", "sd3", "sweep", "--model", str(saved_flow_models("sd3_dir")), "--device", "cpu",
                  "--image", str(inputs[0]), "--prompt", "x", "--steps", "2", "--strengths", "0,1", "--output",
                  str(tmp_path / "sweep.png")])
    err = capsys.readouterr().err
    assert done.value.code == 0 and "flow-matching sampler, the only one it takes" in err, err
    assert "--scheduler ddim" not in err


@pytest.mark.parametrize("family, presses", [(family, 1) for family in FAMILIES]
                         + [(FAMILIES[0], 2)], ids=lambda value: getattr(value, "name", f"{value}x"))
def test_ctrl_c_stops_after_the_step_it_came_in_and_writes_nothing(family, presses, run, inputs, tmp_path,
                                                                   monkeypatch):
    from diffusers import DiffusionPipeline

    steps, progress_bar = [], DiffusionPipeline.progress_bar

    def pressing(pipe, *args, **kwargs):  # Ctrl-C at the end of the first step that runs with run.py's handler
        bar = progress_bar(pipe, *args, **kwargs)
        update = bar.update

        def step_done(*args):
            if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                steps.append(pipe)
                for _ in range(presses if len(steps) == 1 else 0):
                    signal.raise_signal(signal.SIGINT)
            return update(*args)
        bar.update = step_done
        return bar

    monkeypatch.setattr(DiffusionPipeline, "progress_bar", pressing)
    ran = run(family, "--image", inputs[0], "--map", inputs[1], "--prompt", "x", "--steps", "8", "--output",
              tmp_path / "out.png")
    assert (ran.returncode, error_lines(ran)) == (130, ["error: interrupted"]), ran.stderr
    assert len(steps) == 1 and list(tmp_path.glob("out*")) == [] and list(tmp_path.glob(".*partial")) == []
