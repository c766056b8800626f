"""run.py's ControlNet and inpainting-checkpoint flags (#15), end to end on tiny models saved to folders.

The runs are in-process, through the same ``cli.main`` as the command line: each result must equal what the variant's
pipeline gives when called directly with the same settings and seed.
"""

import json

import cv2
import numpy as np
import pytest
import torch
from conftest import load_pipeline, run_in_process, test_image
from diffusers import (
    ControlNetModel, StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline, UNet2DConditionModel,
)
from PIL import Image

from SD2.diff_pipe_controlnet import StableDiffusionControlNetDiffImg2ImgPipeline
from SD2.diff_pipe_inpaint import StableDiffusionDiffInpaintPipeline
from SDXL.diff_pipe_controlnet import StableDiffusionXLControlNetDiffImg2ImgPipeline
from SDXL.diff_pipe_inpaint import StableDiffusionXLDiffInpaintPipeline
from tests.tiny_models import (
    build_pipeline, save_depth_model, sd_inpaint_components, sdxl_inpaint_components, tiny_controlnet,
)
from tools import cli
from tools.maps import depth_map

PROMPT, NEGATIVE_PROMPT, SEED, STEPS = "a red apple", "blurry", 3, 4


@pytest.fixture(scope="module")
def models(tmp_path_factory, sd_dir, sdxl_base_dir):
    """Folders of tiny models: ControlNets for the saved SD and SDXL bases, inpainting checkpoints, a depth model."""
    root = tmp_path_factory.mktemp("conditioning")
    folders = {"sd": sd_dir, "sdxl": sdxl_base_dir, "depth": save_depth_model(root / "depth")}
    for family, base in [("sd", sd_dir), ("sdxl", sdxl_base_dir)]:
        unet = UNet2DConditionModel.from_pretrained(base / "unet")
        for seed in (0, 1):
            folders[f"{family}_cn{seed}"] = root / f"{family}_cn{seed}"
            tiny_controlnet(unet, seed).save_pretrained(folders[f"{family}_cn{seed}"])
    for family, stock, components in [("sd", StableDiffusionInpaintPipeline, sd_inpaint_components),
                                      ("sdxl", StableDiffusionXLInpaintPipeline, sdxl_inpaint_components)]:
        folders[f"{family}_inpaint"] = root / f"{family}_inpaint"
        build_pipeline(stock, components()).save_pretrained(folders[f"{family}_inpaint"])
    return folders


def common_flags(inputs, output):
    image, map_path = inputs
    return ["--device", "cpu", "--image", image, "--map", map_path, "--prompt", PROMPT, "--negative-prompt",
            NEGATIVE_PROMPT, "--steps", STEPS, "--seed", SEED, "--output", output]


def sdxl_flags(inputs, output):
    return [*common_flags(inputs, output), "--width", "64", "--height", "64"]  # not SDXL's native 1024 px


def direct_call(pipe, inputs, **kwargs):
    """The pipeline called as a user would, on the test's image and map, with the flags' settings."""
    image, map_path = inputs
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, negative_prompt=NEGATIVE_PROMPT, image=Image.open(image).convert("RGB"),
                map=Image.open(map_path), num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(SEED), **kwargs).images[0]


def written(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), dict(image.text)


def canny(path):
    """White Canny edges on black at the ControlNet recipe's thresholds, made here without tools.conditioning."""
    edges = cv2.Canny(np.asarray(Image.open(path).convert("RGB")), 100, 200)
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=-1))


# ---------------------------------------------------------------------------------------------------------------
# Results


def test_sd_controlnet_with_a_control_image_is_the_controlnet_pipeline(models, inputs, tmp_path):
    condition, output = tmp_path / "pose.png", tmp_path / "edit.png"
    test_image(seed=5).transpose(Image.Transpose.ROTATE_90).save(condition)
    ran = run_in_process(
        "SD2/run.py",
        "--model", models["sd"], "--controlnet", models["sd_cn0"], "--control-image", condition,
        "--controlnet-scale", "0.7", *common_flags(inputs, output))
    assert ran.returncode == 0, ran.stderr
    # the left half changes fully
    assert ran.stdout.startswith(f"{cli.display(output)} (") and "4 denoising steps" in ran.stdout
    pipe = load_pipeline(models["sd"], StableDiffusionControlNetDiffImg2ImgPipeline,
                         controlnet=ControlNetModel.from_pretrained(models["sd_cn0"]))
    expected = direct_call(pipe, inputs, control_image=Image.open(condition).convert("RGB"),
                           controlnet_conditioning_scale=0.7, guidance_scale=7.0)
    result, text = written(output)
    assert np.array_equal(result, np.asarray(expected))
    assert json.loads(text["controlnet"]) == [str(models["sd_cn0"])]
    assert json.loads(text["control"]) == [str(condition)] and json.loads(text["controlnet_scale"]) == [0.7]
    assert "inpaint_model" not in text and "depth_model" not in text


def test_two_controlnets_on_canny_and_depth_made_from_the_image(models, inputs, tmp_path):
    output = tmp_path / "edit.png"
    ran = run_in_process(
        "SD2/run.py",
        "--model", models["sd"], "--controlnet", models["sd_cn0"], "--controlnet", models["sd_cn1"], "--control",
        "canny", "--control", "depth", "--depth-model", models["depth"], "--controlnet-scale", "0.5",
        "--controlnet-scale", "1.5", *common_flags(inputs, output))
    assert ran.returncode == 0, ran.stderr
    image = Image.open(inputs[0]).convert("RGB")
    edges = canny(inputs[0])
    assert set(np.unique(np.asarray(edges))) == {0, 255}  # edges are white on black
    nearness = depth_map(image, model=str(models["depth"]), near="keep")  # near = 1
    depth = Image.fromarray(np.round(nearness * 255).astype(np.uint8)).convert("RGB")  # near = bright
    nets = [ControlNetModel.from_pretrained(models[name]) for name in ("sd_cn0", "sd_cn1")]
    pipe = load_pipeline(models["sd"], StableDiffusionControlNetDiffImg2ImgPipeline, controlnet=nets)
    expected = direct_call(pipe, inputs, control_image=[edges, depth], controlnet_conditioning_scale=[0.5, 1.5],
                           guidance_scale=7.0)
    result, text = written(output)
    assert np.array_equal(result, np.asarray(expected))
    assert json.loads(text["control"]) == ["canny", "depth"] and text["depth_model"] == str(models["depth"])
    assert json.loads(text["controlnet_scale"]) == [0.5, 1.5] and len(json.loads(text["controlnet"])) == 2


@pytest.mark.parametrize("script, name, pipeline_class, flags, settings, text", [
    ("SD2/run.py", "sd_inpaint", StableDiffusionDiffInpaintPipeline, ["--keep-exact"],
     dict(guidance_scale=7.0, keep_exact=True), {}),
    ("SDXL/run.py", "sdxl_inpaint", StableDiffusionXLDiffInpaintPipeline, ["--width", "64", "--height", "64"],
     dict(guidance_scale=17.5), {"refiner": "none"}),
])
def test_an_inpaint_model_is_the_inpaint_pipeline(models, inputs, tmp_path, script, name, pipeline_class, flags,
                                                  settings, text):
    output = tmp_path / "edit.png"
    ran = run_in_process(script, "--inpaint-model", models[name], *flags, *common_flags(inputs, output))
    assert ran.returncode == 0, ran.stderr
    expected = direct_call(load_pipeline(models[name], pipeline_class), inputs, height=64, width=64, **settings)
    result, written_text = written(output)
    assert np.array_equal(result, np.asarray(expected))
    expected_text = {"inpaint_model": str(models[name]), "model": str(models[name]), **text}
    assert {key: written_text.get(key) for key in expected_text} == expected_text and "controlnet" not in written_text
    if "--keep-exact" in flags:
        assert np.array_equal(result[:, 32:], np.asarray(Image.open(inputs[0]).convert("RGB"))[:, 32:])  # kept half


def test_sdxl_controlnet_runs_on_the_base_alone(models, inputs, tmp_path):
    output = tmp_path / "edit.png"
    ran = run_in_process(
        "SDXL/run.py",
        "--model", models["sdxl"], "--controlnet", models["sdxl_cn0"], "--control", "canny",
        *sdxl_flags(inputs, output))
    assert ran.returncode == 0, ran.stderr
    assert "4 denoising steps" in ran.stdout  # the base alone runs the whole schedule; the refiner is implied off
    pipe = load_pipeline(models["sdxl"], StableDiffusionXLControlNetDiffImg2ImgPipeline,
                         controlnet=ControlNetModel.from_pretrained(models["sdxl_cn0"]))
    expected = direct_call(pipe, inputs, control_image=canny(inputs[0]), controlnet_conditioning_scale=1.0,
                           guidance_scale=17.5)
    result, text = written(output)
    assert np.array_equal(result, np.asarray(expected))
    assert text["refiner"] == "none" and json.loads(text["control"]) == ["canny"]


# ---------------------------------------------------------------------------------------------------------------
# Refusals: one line, an exit status, no output


def assert_refused(script, flags, status, message, output):
    ran = run_in_process(script, *flags)
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    assert (ran.returncode, len(errors)) == (status, 1) and message in errors[0], ran.stderr
    assert "Traceback" not in ran.stderr and ran.stdout == "" and not output.exists()


@pytest.mark.parametrize("case, extra, status, message", [
    ("condition without a controlnet", ["--control-image", "{image}"], 2,
     "--control-image is for a ControlNet: pass --controlnet ID_OR_PATH too"),
    ("canny without a controlnet", ["--control", "canny"], 2, "--control is for a ControlNet"),
    ("scale without a controlnet", ["--controlnet-scale", "0.5"], 2, "--controlnet-scale is for a ControlNet"),
    ("controlnet and inpaint model", ["--controlnet", "{sd_cn0}", "--control", "canny", "--inpaint-model",
                                      "{sd_inpaint}"], 2, "there is no ControlNet inpainting variant here"),
    ("no condition", ["--controlnet", "{sd_cn0}"], 2, "--controlnet needs a condition"),
    ("image and canny", ["--controlnet", "{sd_cn0}", "--control", "canny", "--control-image", "{image}"], 2,
     "--control-image and --control are alternatives"),
    ("three scales for two", ["--controlnet", "{sd_cn0}", "--controlnet", "{sd_cn1}", "--control", "canny"]
     + ["--controlnet-scale", "1"] * 3, 2, "3 --controlnet-scale for 2 --controlnet"),
    ("two images for one", ["--controlnet", "{sd_cn0}", "--control-image", "{image}", "--control-image",
                            "{image}"], 2, "2 --control-image for 1 --controlnet"),
    ("negative scale", ["--controlnet", "{sd_cn0}", "--control", "canny", "--controlnet-scale", "-1"], 2,
     "--controlnet-scale: must be a number of at least 0"),
    ("depth model without depth", ["--controlnet", "{sd_cn0}", "--control", "canny", "--depth-model",
                                   "{depth}"], 2, "--depth-model estimates depth for --control depth"),
    ("inpaint model and another model", ["--inpaint-model", "{sd_inpaint}"], 2,
     "--inpaint-model replaces --model: pass only one of them"),
    ("missing control image", ["--controlnet", "{sd_cn0}", "--control-image", "{tmp}/nowhere.png"], 2,
     "nowhere.png: no such file"),
    ("control image of another shape", ["--controlnet", "{sd_cn0}", "--control-image", "{wide}"], 2,
     "is 64x32, not of the aspect ratio of the image (64x64)"),
    ("inpainting checkpoint as --model", ["--model", "{sd_inpaint}"], 2,
     "is an inpainting checkpoint (its UNet reads 9 channels): pass it as --inpaint-model"),
    ("plain checkpoint as --inpaint-model", ["--inpaint-model", "{sd}"], 2,
     "its UNet reads 4 channels, not the 9 of an inpainting checkpoint; pass it as --model"),
    ("sdxl controlnet for sd", ["--controlnet", "{sdxl_cn0}", "--control", "canny"], 2,
     "was made for another model family (text width 64, added embeddings text_time) than --model"),
    ("controlnet not cached", ["--controlnet", "someone/not-cached-controlnet", "--control", "canny"], 1,
     "cannot load model someone/not-cached-controlnet: it is not fully cached locally"),
    ("missing depth model", ["--controlnet", "{sd_cn0}", "--control", "depth", "--depth-model",
                             "{tmp}/no-depth-model"], 1, "no-depth-model: cannot load it as a depth-estimation model"),
    ("pipeline as controlnet", ["--controlnet", "{sd}", "--control", "canny"], 2, "an SD 1.x/2.x checkpoint "
     "(StableDiffusionImg2ImgPipeline), for SD2/run.py; here --controlnet takes a ControlNet model"),
    ("pipeline as depth model", ["--controlnet", "{sd_cn0}", "--control", "depth", "--depth-model", "{sd}"], 2,
     "for SD2/run.py; here --depth-model takes a transformers depth-estimation model"),
    # SDXL/run.py, whose --model, where it has one, is in the row
    ("sdxl: sd controlnet for sdxl", ["--model", "{sdxl}", "--controlnet", "{sd_cn0}", "--control", "canny"], 2,
     "was made for another model family (text width 32, added embeddings none) than --model"),
    ("sdxl: controlnet with a refiner", ["--model", "{sdxl}", "--controlnet", "{sdxl_cn0}", "--control", "canny",
                                         "--refiner", "{sdxl}"], 2,
     "--controlnet runs the base alone over the whole schedule"),
    ("sdxl: inpaint model with a refiner start", ["--inpaint-model", "{sdxl_inpaint}", "--refiner-start", "0.5"], 2,
     "--inpaint-model runs the base alone over the whole schedule"),
])
def test_sd_and_sdxl_refuse_in_one_line(models, inputs, tmp_path, case, extra, status, message):
    Image.new("RGB", (64, 32)).save(tmp_path / "wide.png")
    names = {**{name: str(path) for name, path in models.items()}, "image": inputs[0], "tmp": tmp_path,
             "wide": tmp_path / "wide.png"}
    output = tmp_path / "out.png"
    sdxl = case.startswith("sdxl:")
    model = [] if sdxl else ["--model", models["sd"]]
    flags = [*model, *(sdxl_flags if sdxl else common_flags)(inputs, output), *(flag.format(**names) for flag in extra)]
    assert_refused("SDXL/run.py" if sdxl else "SD2/run.py", flags, status, message, output)


def test_batch_edits_rows_with_a_controlnet_as_the_pipeline_does(models, tmp_path):
    from tools import batch

    for seed in (1, 2):
        test_image(seed=seed).save(tmp_path / f"photo{seed}.png")
    keep_map = np.ones((64, 64), np.uint8) * 255
    keep_map[:, :32] = 0
    Image.fromarray(keep_map).save(tmp_path / "map.png")
    (tmp_path / "jobs.csv").write_text("image,map,prompt,seed\nphoto1.png,map.png,a red apple,5\n"
                                       "photo2.png,map.png,a green pear,6\n")
    assert batch.run(["--family", "sd2", str(tmp_path / "jobs.csv"), "--output-dir", str(tmp_path / "out"),
                      "--model", str(models["sd"]), "--controlnet", str(models["sd_cn0"]), "--control", "canny",
                      "--device", "cpu", "--steps", str(STEPS), "--batch-size", "2"]) == 0
    pipe = load_pipeline(models["sd"], StableDiffusionControlNetDiffImg2ImgPipeline,
                         controlnet=ControlNetModel.from_pretrained(models["sd_cn0"]))
    for line, (seed, prompt) in enumerate([(1, "a red apple"), (2, "a green pear")], start=1):
        photo = tmp_path / f"photo{seed}.png"
        expected = pipe(prompt, negative_prompt=(cli.EXAMPLE_NEGATIVE_PROMPT.read_text().strip()),
                        image=Image.open(photo).convert("RGB"), control_image=canny(photo),
                        map=Image.open(tmp_path / "map.png"), num_inference_steps=STEPS, guidance_scale=7.0,
                        controlnet_conditioning_scale=1.0, generator=torch.Generator().manual_seed(4 + seed)).images[0]
        result, text = written(tmp_path / "out" / f"{line:04d}-photo{seed}.png")
        # Two rows in one call sum in another order than one alone: a pixel level or two may flip (tests/test_batch.py).
        difference = np.abs(result.astype(int) - np.asarray(expected))
        assert difference.max() <= 1 and np.count_nonzero(difference) <= 8
        assert "controlnet" in text and text["prompt"] == prompt


@pytest.mark.parametrize("variant", ["controlnet", "inpaint"])
def test_crop_margin_reaches_the_controlnet_and_inpaint_variants(models, inputs, tmp_path, variant):
    # The map changes the left half; with 4 px of margin the crop ends by column 40 (a multiple of 8, which stock
    # inpainting asks for), and the pixels right of it are the input's own.
    output = tmp_path / "edit.png"
    flags = {"controlnet": ["--model", models["sd"], "--controlnet", models["sd_cn0"], "--control", "canny"],
             "inpaint": ["--inpaint-model", models["sd_inpaint"]]}[variant]
    ran = run_in_process("SD2/run.py", *flags, "--crop-margin", "4", *common_flags(inputs, output))
    assert ran.returncode == 0, ran.stderr
    result, text = written(output)
    original = np.asarray(Image.open(inputs[0]).convert("RGB"))
    assert text["crop_margin"] == "4"
    assert np.array_equal(result[:, 40:], original[:, 40:])
    assert np.abs(result[:, :32].astype(int) - original[:, :32]).mean() > 5
