"""run.py's edit models (#23): Flux/run.py --kontext and --fill, QwenImage/run.py --edit, end to end on tiny models
saved to folders. Each result must equal what the variant's pipeline gives when called directly with the same
settings and seed, and the command in its PNG text must make it again, pixel for pixel. Flux2/run.py is a model folder
of its own, checked with the others in tests/test_run_contract.py."""

import shlex

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, load_pipeline, run_in_process
from diffusers import FluxFillPipeline, FluxKontextInpaintPipeline, QwenImageEditInpaintPipeline
from fill_models import flux_fill_components
from flow_models import flux_components
from PIL import Image

from Flux.diff_pipe_fill import FluxDiffFillPipeline
from Flux.diff_pipe_kontext import FluxKontextDiffInpaintPipeline
from Flux2.diff_pipe import Flux2KleinDiffInpaintPipeline
from tests.edit_models import save_flux2_klein
from QwenImage.diff_pipe_edit import QwenImageEditDiffInpaintPipeline
from tests.qwen_edit_models import TEST_AREA, qwenimage_edit_components, small_working_area
from tests.tiny_models import save_stock

PROMPT, SEED, STEPS = "make it red", 3, 4


def written(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), dict(image.text)


def direct_call(pipe, image, map_path, **kwargs):
    """The pipeline called as a user would, with the flags' settings."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, image=Image.open(image).convert("RGB"), map=Image.open(map_path),
                num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), **kwargs).images[0]


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    return save_stock(FluxKontextInpaintPipeline, flux_components, tmp_path_factory.mktemp("kontext"))


@pytest.fixture(scope="module")
def fill_dir(tmp_path_factory):
    return save_stock(FluxFillPipeline, flux_fill_components, tmp_path_factory.mktemp("fill"))


def rerun(text, tmp_path):
    """The command that the PNG text records, run again (in process) to a new output."""
    words = shlex.split(text["command"])
    assert words[:2] == ["python", "Flux/run.py"] or words[1].endswith("run.py"), words
    return run_in_process(words[1], *words[2:], "--output", tmp_path / "again.png", cwd=REPO_ROOT)


def test_kontext_edits_by_instruction_with_a_reference_and_its_png_makes_it_again(kontext_dir, inputs, tmp_path):
    image, map_path = inputs
    reference = tmp_path / "reference.png"
    Image.fromarray(np.full((48, 48, 3), 200, np.uint8)).save(reference)
    output = tmp_path / "edit.png"
    ran = run_in_process("Flux/run.py", "--kontext", "--model", kontext_dir, "--device", "cpu", "--image", image,
                         "--map", map_path, "--prompt", PROMPT, "--steps", STEPS, "--seed", SEED, "--strength", "0.5",
                         "--reference", reference, "--own-size", "--true-cfg-scale", "1.5", "--output", output,
                         cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.endswith(", 2 denoising steps)\n"), ran.stdout  # ceil(4 * 0.5)
    edited, text = written(output)
    assert (text["variant"], text["reference"], text["own_size"]) == ("kontext", str(reference), "True")
    expected = direct_call(load_pipeline(kontext_dir, FluxKontextDiffInpaintPipeline), image, map_path,
                           strength=0.5, image_reference=Image.open(reference).convert("RGB"), _auto_resize=False,
                           negative_prompt=(REPO_ROOT / "assets" / "negative_prompt.txt").read_text().strip(),
                           true_cfg_scale=1.5, guidance_scale=3.5)
    assert np.array_equal(edited, np.asarray(expected))
    again = rerun(text, tmp_path)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(written(tmp_path / "again.png")[0], edited)


def test_fill_edits_with_its_mask_following_the_map_and_its_png_makes_it_again(fill_dir, inputs, tmp_path):
    image, map_path = inputs
    output = tmp_path / "edit.png"
    ran = run_in_process("Flux/run.py", "--fill", "--model", fill_dir, "--device", "cpu", "--image", image, "--map",
                         map_path, "--prompt", PROMPT, "--steps", STEPS, "--seed", SEED, "--strength", "0.6",
                         "--output", output, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.endswith(", 3 denoising steps)\n"), ran.stdout  # ceil(4 * 0.6)
    edited, text = written(output)
    assert (text["variant"], text["guidance_scale"]) == ("fill", "30.0")  # stock Fill's own guidance
    expected = direct_call(load_pipeline(fill_dir, FluxDiffFillPipeline), image, map_path, strength=0.6,
                           height=64, width=64, guidance_scale=30.0)
    assert np.array_equal(edited, np.asarray(expected))
    again = rerun(text, tmp_path)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(written(tmp_path / "again.png")[0], edited)


def test_qwen_image_edit_edits_by_instruction_at_stocks_size_and_its_png_makes_it_again(tmp_path_factory, inputs,
                                                                                         tmp_path):
    image, map_path = inputs
    folder = save_stock(QwenImageEditInpaintPipeline, qwenimage_edit_components, tmp_path_factory.mktemp("qwenedit"))
    output = tmp_path / "edit.png"
    flags = ["--edit", "--model", folder, "--device", "cpu", "--image", image, "--map", map_path, "--prompt", PROMPT,
             "--steps", STEPS, "--seed", SEED, "--keep-exact"]
    with small_working_area():  # stock works at about 1024 x 1024 px; TEST_AREA px here, for stock and ours alike
        ran = run_in_process("QwenImage/run.py", *flags, "--output", output, cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr
        edited, text = written(output)
        side = round(TEST_AREA**0.5 / 32) * 32  # stock's size for a square image: its area in multiples of 32 px
        assert text["variant"] == "edit" and edited.shape == (side, side, 3)
        # As run.py calls it, a batch of one in lists: stock Qwen-Image-Edit reads a listed image a level apart.
        pipe = load_pipeline(folder, QwenImageEditDiffInpaintPipeline)
        expected = pipe(prompt=[PROMPT], image=[Image.open(image).convert("RGB")], map=[Image.open(map_path)],
                        negative_prompt=[(REPO_ROOT / "assets" / "negative_prompt.txt").read_text().strip()],
                        num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(SEED)],
                        true_cfg_scale=4.0, keep_exact=True).images[0]
        assert np.array_equal(edited, np.asarray(expected))
        again = rerun(text, tmp_path)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(written(tmp_path / "again.png")[0], edited)


def test_flux2_klein_guides_against_a_negative_prompt_and_reads_a_reference(tmp_path_factory, inputs, tmp_path):
    image, map_path = inputs
    folder = save_flux2_klein(tmp_path_factory.mktemp("klein"))
    reference = tmp_path / "reference.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(reference)
    ran = run_in_process("Flux2/run.py", "--model", folder, "--device", "cpu", "--image", image, "--map", map_path,
                         "--prompt", PROMPT, "--negative-prompt", "blurry", "--reference", reference, "--steps", STEPS,
                         "--seed", SEED, "--output", tmp_path / "edit.png", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    edited, text = written(tmp_path / "edit.png")
    assert (text["reference"], text["negative_prompt"]) == (str(reference), "blurry")
    pipe = load_pipeline(folder, Flux2KleinDiffInpaintPipeline)
    negative = pipe.encode_prompt(prompt=["blurry"], device="cpu")[0]  # stock takes no negative prompt as text
    expected = pipe(prompt=[PROMPT], image=[Image.open(image).convert("RGB")], map=[Image.open(map_path)],
                    image_reference=Image.open(reference).convert("RGB"), negative_prompt_embeds=negative,
                    num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(SEED)]).images[0]
    assert np.array_equal(edited, np.asarray(expected))
    without = pipe(prompt=[PROMPT], image=[Image.open(image).convert("RGB")], map=[Image.open(map_path)],
                   image_reference=Image.open(reference).convert("RGB"), num_inference_steps=STEPS,
                   generator=[torch.Generator().manual_seed(SEED)]).images[0]
    assert not np.array_equal(edited, np.asarray(without))  # the negative prompt was not dropped


@pytest.mark.parametrize("flags, message", [
    (["--reference", "{image}"], "--reference conditions the edit of --kontext: pass --kontext too"),
    (["--own-size"], "--own-size keeps --kontext from resizing the image: pass --kontext too"),
    (["--kontext", "--fill"], "--kontext and --fill pick different models: pass one of them"),
    (["--fill", "--true-cfg-scale", "2"], "FLUX.1 Fill takes no negative prompt"),
    (["--kontext", "--crop-margin", "8"], "--kontext resizes what it edits to a Kontext resolution: pass --own-size"),
    (["--kontext", "--reference", "nowhere.png"], "--reference nowhere.png: no such file"),
    (["--model", "{kontext_dir}"], "a FLUX.1 Kontext checkpoint (FluxKontextInpaintPipeline), for Flux/run.py "
                                   "--kontext; here --model takes a Flux checkpoint"),
    (["--fill", "--model", "{kontext_dir}"], "for Flux/run.py --kontext; here --model takes a FLUX.1 Fill checkpoint"),
])
def test_edit_model_flags_that_do_not_go_together_are_one_line(flags, message, kontext_dir, inputs, tmp_path):
    image, map_path = inputs
    flags = [str(flag).format(image=image, kontext_dir=kontext_dir) for flag in flags]
    ran = run_in_process("Flux/run.py", "--device", "cpu", "--image", image, "--map", map_path, "--prompt", "x",
                         "--steps", "2", *flags, "--output", tmp_path / "out.png", cwd=tmp_path)
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    assert ran.returncode == 2 and len(errors) == 1 and message in errors[0], ran.stderr
    assert not (tmp_path / "out.png").exists()


def test_qwen_image_edit_refuses_a_crop_in_one_line(inputs, tmp_path):
    image, map_path = inputs
    ran = run_in_process("QwenImage/run.py", "--edit", "--device", "cpu", "--image", image, "--map", map_path,
                         "--prompt", "x", "--crop-margin", "8", "--output", tmp_path / "out.png", cwd=tmp_path)
    assert (ran.returncode, ran.stderr.splitlines()) == (2, [
        "error: --crop-margin edits the crop at its own size, and Qwen-Image-Edit edits every image at about "
        "1024x1024 pixels: drop --crop-margin"])


def test_each_variant_defaults_to_its_stock_pipelines_model_steps_and_guidance():
    from tools import loading

    parser = loading.load_family("flux").build_parser()
    for flags, expected in [([], ("black-forest-labs/FLUX.1-dev", 28, 3.5)),
                            (["--kontext"], ("black-forest-labs/FLUX.1-Kontext-dev", 28, 3.5)),
                            (["--fill"], ("black-forest-labs/FLUX.1-Fill-dev", 50, 30.0)),
                            (["--fill", "--steps", "7"], ("black-forest-labs/FLUX.1-Fill-dev", 7, 30.0))]:
        args = parser.parse_args(flags)
        assert (args.model, args.steps, args.guidance_scale) == expected, flags


def test_a_batch_row_of_an_edit_model_is_what_its_run_py_gives(kontext_dir, inputs, tmp_path):
    from tools import batch

    image, map_path = inputs
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"image,map,prompt,seed,output\n{image},{map_path},{PROMPT},{SEED},row.png\n")
    flags = ["--kontext", "--own-size", "--model", str(kontext_dir), "--device", "cpu", "--steps", str(STEPS)]
    assert batch.run(["--family", "flux", str(jobs), "--output-dir", str(tmp_path / "out"), *flags]) == 0
    ran = run_in_process("Flux/run.py", *flags, "--image", image, "--map", map_path, "--prompt", PROMPT, "--seed", SEED,
                         "--output", tmp_path / "run.png", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    row, text = written(tmp_path / "out" / "row.png")
    assert np.array_equal(row, written(tmp_path / "run.png")[0])
    assert (text["kontext"], text["own_size"], text["family"]) == ("True", "True", "flux")
