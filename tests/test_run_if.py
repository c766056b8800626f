"""What only IF/run.py does (three stages, their files, the crop, wrong models, fp16, offload, the licence gate); runs
go through conftest's `run_in_process`, and tests/test_run_contract.py checks what every run.py does."""

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    REPO_ROOT, SEED, build_pipeline, clip_text_model, clip_tokenizer, if_stage1_components, run_in_process,
    save_pipeline, test_image,
)
from diffusers import (
    AutoencoderKL, DDIMScheduler, DDPMScheduler, IFImg2ImgPipeline, StableDiffusionUpscalePipeline, UNet2DConditionModel
)
from PIL import Image

from IF import run as if_run
from IF.diff_pipe_I import IFDiffImg2ImgPipeline
from tools import cli
from tools.maps import save_map

SCRIPT = "IF/run.py"
GATED_MODEL = "DeepFloyd/IF-I-XL-v1.0"


def upscaler_components():
    """A tiny StableDiffusionUpscalePipeline: a VAE with scale factor 4, a UNet reading latents and the image."""
    tokenizer = clip_tokenizer()
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=7, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, num_class_embeds=1000,  # one class per noise level
    ).eval()
    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 64], down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, latent_channels=4, layers_per_block=1, scaling_factor=0.08333,
    ).eval()
    return dict(unet=unet, vae=vae, text_encoder=clip_text_model(tokenizer), tokenizer=tokenizer,
                low_res_scheduler=DDPMScheduler(), scheduler=DDIMScheduler(prediction_type="v_prediction"),
                safety_checker=None, feature_extractor=None, watermarker=None, max_noise_level=350)


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory):
    pipe = build_pipeline(StableDiffusionUpscalePipeline, upscaler_components())
    return save_pipeline(pipe, tmp_path_factory.mktemp("upscaler"))


@pytest.fixture
def models(if_stage1_dir, if_stage2_dir):
    return ["--model", if_stage1_dir, "--stage2-model", if_stage2_dir]


def short_run(models, inputs, *extra):
    image, map_path = inputs
    return [*models, "--device", "cpu", "--image", image, "--map", map_path, "--prompt", "a red apple", "--steps",
            "10", "--stage2-steps", "4", *extra]


def written(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), dict(image.text)


def test_each_stage_writes_its_image_and_edit_gives_the_same_in_process(models, inputs, upscaler_dir, tmp_path):
    output = tmp_path / "edit.png"
    argv = short_run(models, inputs, "--stage3-model", upscaler_dir, "--stage3-steps", "2", "--stage3-noise-level",
                     "20", "--strength", "0.5", "--seed", "7", "--output", output, "--compare")
    result = run_in_process(SCRIPT, *argv)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[:-1] == [f"stage 1: {tmp_path / 'edit-stage1.png'}", f"stage 2: {tmp_path / 'edit-stage2.png'}"]
    assert lines[-1].startswith(f"{output} (") and "9 denoising steps" in lines[-1]  # 10 * 0.5 + 4 * 0.5 + 2
    files = ["edit-compare.png", "edit-stage1.png", "edit-stage2.png", "edit.png"]
    assert sorted(path.name for path in tmp_path.glob("edit*")) == files
    (stage1, text1), (stage2, text2) = written(tmp_path / "edit-stage1.png"), written(tmp_path / "edit-stage2.png")
    final, text = written(output)
    assert (stage1.shape, stage2.shape, final.shape) == ((32, 32, 3), (64, 64, 3), (256, 256, 3))  # x4 at the end
    assert [t["steps_run"] for t in (text1, text2, text)] == ["5", "7", "9"] and (text1["stage"], text2["stage"]) == (
        "1", "2")
    assert text["stage2_model"] == str(models[3]) and text["stage3_model"] == str(upscaler_dir)
    assert (text["stage2_steps"], text["stage3_noise_level"], text["seed"]) == ("4", "20", "7")

    # Batch editing calls load_pipelines and edit in its own process: they must give the very same pixels.
    args = cli.parse_args(if_run.build_parser(), [str(a) for a in argv[:-3]] + ["--output", str(tmp_path / "x.png")])
    image, map_image = cli.load_inputs(args)
    pipelines = if_run.load_pipelines(args)
    for pipe in pipelines:
        pipe.set_progress_bar_config(disable=True)
    stages = {}
    images, steps_run = if_run.edit(
        pipelines, args, images=[image], maps=[map_image], prompts=[args.prompt],
        negative_prompts=[args.negative_prompt], seeds=[args.seed],
        on_stage=lambda stage, pil_images, steps: stages.update({stage: (np.asarray(pil_images[0]), steps)}),
    )
    assert steps_run == 9 and [steps for _, steps in stages.values()] == [5, 7, 9]
    assert np.array_equal(stages[1][0], stage1) and np.array_equal(stages[2][0], stage2)
    assert np.array_equal(np.asarray(images[0]), final) and np.array_equal(stages[3][0], final)


def test_crop_margin_edits_stage_twos_box_and_keeps_the_resized_input_around_it(models, inputs, upscaler_dir,
                                                                               tmp_path):
    image, _ = inputs
    keep_map = np.ones((64, 64), np.float32)
    keep_map[40:56, 8:24] = 0.0  # stage II works at the input's 64 px: with 4 px of margin its box is 36-59, 4-27
    map_path = tmp_path / "block.png"
    save_map(keep_map, map_path)
    output = tmp_path / "cropped.png"
    argv = [*models, "--stage3-model", upscaler_dir, "--device", "cpu", "--image", image, "--map", map_path,
            "--prompt", "a red apple", "--steps", "3", "--stage2-steps", "2", "--stage3-steps", "2",
            "--crop-margin", "4", "--output", output]
    ran = run_in_process(SCRIPT, *argv)  # a subprocess would cost more than the run
    assert ran.returncode == 0, ran.stderr
    assert "7 denoising steps" in ran.stdout.strip().splitlines()[-1]  # 3 + 2, and the upscaler's 2
    with Image.open(image) as source:
        original = np.asarray(source.convert("RGB"))
        resized = np.asarray(source.convert("RGB").resize((256, 256), Image.Resampling.BICUBIC))  # x4 of stage II
    stage2, _ = written(tmp_path / "cropped-stage2.png")
    final, text = written(output)
    assert (text["crop_margin"], text["crop_upscale"], final.shape) == ("4", "False", (256, 256, 3))
    for edited, source, (top, left, bottom, right) in [(stage2, original, (36, 4, 60, 28)),
                                                      (final, resized, (144, 16, 240, 112))]:
        outside = np.ones(source.shape[:2], bool)
        outside[top:bottom, left:right] = False
        assert np.array_equal(edited[outside], source[outside])
        assert np.abs(edited[~outside].astype(int) - source[~outside]).mean() > 5

    # A map that releases nothing at stage II runs no upscaling: the output is the resized input.
    args = cli.parse_args(if_run.build_parser(), [str(a) for a in argv] + ["--overwrite"])
    pipelines = if_run.load_pipelines(args)
    white = Image.fromarray(np.full((64, 64), 255, np.uint8))
    with Image.open(image) as source:
        (unchanged,), steps_run = if_run.edit(pipelines, args, images=[source.convert("RGB")], maps=[white],
                                              prompts=["a red apple"], negative_prompts=[""], seeds=[0])
    assert steps_run == 0 and np.array_equal(np.asarray(unchanged), resized)


def test_ctrl_c_in_the_upscaler_stops_after_its_step_and_writes_no_output(models, inputs, upscaler_dir, tmp_path,
                                                                          monkeypatch):
    """The x4 upscaler reads only the older step callback (tools/running.py): the first Ctrl-C ends it after the step
    it came in, as it ends stages I and II (tests/test_run_contract.py); the stages' files written before it stay."""
    from diffusers import DiffusionPipeline

    upscaler_steps, progress_bar = [], DiffusionPipeline.progress_bar

    def pressing(pipe, *args, **kwargs):  # Ctrl-C at the end of the upscaler's first step
        bar = progress_bar(pipe, *args, **kwargs)
        update = bar.update

        def step_done(*args):
            if isinstance(pipe, StableDiffusionUpscalePipeline):
                upscaler_steps.append(signal.getsignal(signal.SIGINT) is not signal.default_int_handler)
                if len(upscaler_steps) == 1:
                    signal.raise_signal(signal.SIGINT)
            return update(*args)
        bar.update = step_done
        return bar

    monkeypatch.setattr(DiffusionPipeline, "progress_bar", pressing)
    ran = run_in_process(SCRIPT, *short_run(models, inputs, "--stage3-model", upscaler_dir, "--stage3-steps", "4",
                                            "--output", tmp_path / "edit.png", "--compare"), cwd=tmp_path)
    assert (ran.returncode, ran.stderr.splitlines()[-1]) == (130, "error: interrupted"), ran.stderr
    assert "stopping after this step" in ran.stderr
    assert upscaler_steps == [True]  # one step, run with run.py's handler: none after the press
    assert sorted(path.name for path in tmp_path.iterdir()) == ["edit-stage1.png", "edit-stage2.png", "map.png",
                                                                 "photo.png"]


# Errors, in this process


def run_main(argv, cwd):
    """IF/run.py in this process, in `cwd`: (exit status, stdout, its error lines)."""
    ran = run_in_process(SCRIPT, *argv, cwd=cwd)
    return ran.returncode, ran.stdout, [line for line in ran.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    "case, extra, code, message",
    [
        ("stage II model as stage I", ["--model", "{stage2}"], 2, "--model"),
        ("stage I model as stage II", ["--stage2-model", "{stage1}"], 1, "--stage2-model"),
        ("upscaler as stage II", ["--stage2-model", "{upscaler}"], 2, "--stage2-model {upscaler}: an x4 upscaler"),
        ("stage II as upscaler", ["--stages", "3", "--stage3-model", "{stage2}"], 2, "a DeepFloyd IF checkpoint"),
        ("a folder that is no pipeline", ["--model", "{stage1}/unet"], 1, "model_index.json"),
    ],
)
def test_a_wrong_model_folder_gives_one_line_naming_the_flag(models, inputs, upscaler_dir, tmp_path,
                                                              case, extra, code, message):
    image, map_path = inputs
    before = {path: path.read_bytes() for path in inputs}
    folders = {"stage1": models[1], "stage2": models[3], "upscaler": upscaler_dir}
    extra, message = [value.format(**folders) for value in extra], message.format(**folders)
    argv = [*short_run(models, inputs, "--stages", "2"), "--output", tmp_path / "out.png", *extra]
    exit_code, out, errors = run_main(argv, tmp_path)
    assert exit_code == code and len(errors) == 1 and message in errors[0], errors
    assert {path: path.read_bytes() for path in inputs} == before
    assert not list(tmp_path.glob("out*.png"))


def test_a_stage_file_that_exists_is_never_overwritten(models, inputs, tmp_path, monkeypatch):
    taken = tmp_path / "edit-stage1.png"
    taken.write_bytes(b"the user's picture")
    argv = [*short_run(models, inputs, "--stages", "2"), "--output", tmp_path / "edit.png"]
    exit_code, _, errors = run_main(argv, tmp_path)
    assert exit_code == 2 and "edit-stage1.png already exists" in errors[0] and "--overwrite" in errors[0]
    assert taken.read_bytes() == b"the user's picture"
    # Without --output, the first name whose stage files are free too (default names are in the working folder).
    monkeypatch.chdir(tmp_path)

    def output(*extra):
        return cli.parse_args(if_run.build_parser(), [str(a) for a in short_run(models, inputs, *extra)]).output.name

    assert output() == "output.png"
    (tmp_path / "output-stage2.png").write_bytes(b"an earlier run")
    assert output() == "output-1.png"
    assert output("--stages", "1") == "output.png"  # one stage writes only --output


def test_one_stage_writes_only_the_output_and_mask_and_keep_exact_reach_the_pipeline(models, tmp_path):
    """Soft inpainting at stage I's own size: beyond the feathered region, the input's bytes come back."""
    image, mask = tmp_path / "small.png", tmp_path / "hole.png"
    test_image(32).save(image)
    hole = np.zeros((32, 32), np.uint8)
    hole[8:16, 8:16] = 255  # white = fill
    Image.fromarray(hole).save(mask)
    argv = [*models, "--device", "cpu", "--image", image, "--mask", mask, "--feather", "4", "--keep-exact",
            "--prompt", "a red apple", "--steps", "10", "--stages", "1", "--output", tmp_path / "edit.png"]
    exit_code, out, errors = run_main(argv, tmp_path)
    assert exit_code == 0 and errors == []
    assert sorted(p.name for p in tmp_path.glob("edit*")) == ["edit.png"]
    assert "10 denoising steps" in out.strip().splitlines()[-1]  # the hole changes fully
    result, text = written(tmp_path / "edit.png")
    assert result.shape == (32, 32, 3)
    original = np.asarray(Image.open(image))
    assert text["keep_exact"] == "True" and text["mask"].endswith("hole.png")
    assert np.array_equal(result[24:], original[24:]) and np.array_equal(result[:, 24:], original[:, 24:])
    assert not np.array_equal(result[10:14, 10:14], original[10:14, 10:14])


def test_fp16_loads_the_fp16_files_where_a_model_has_them(tmp_path):
    args = SimpleNamespace(dtype="fp16", device="cpu", scheduler="default")
    only_fp16 = tmp_path / "only-fp16"
    build_pipeline(IFImg2ImgPipeline, if_stage1_components()).to(torch.float16).save_pretrained(
        only_fp16, variant="fp16"
    )
    unet_files = {path.name for path in (only_fp16 / "unet").glob("*.safetensors")}
    assert unet_files == {"diffusion_pytorch_model.fp16.safetensors"}
    full = save_pipeline(build_pipeline(IFImg2ImgPipeline, if_stage1_components()), tmp_path / "full")
    for folder in (only_fp16, full):  # the second has no fp16 files: it loads the full ones in half precision
        pipe = if_run._load_if_stage(IFDiffImg2ImgPipeline, str(folder), "--model", args, False,
                                     super_resolution=False)
        assert pipe.unet.dtype == torch.float16 and pipe.safety_checker is None and pipe.watermarker is None


def test_offload_is_on_with_cuda_unless_turned_off():
    parser = if_run.build_parser()
    for argv, expected in [([], None), (["--no-offload"], False), (["--offload"], True),
                           (["--offload", "--no-offload"], False)]:
        assert parser.parse_args(argv).offload is expected


# The licence gate, end to end against a stand-in for the Hub


class GatedHub(http.server.BaseHTTPRequestHandler):
    """Answers as the Hub does a user without access: the model's card is public, its files are gated."""

    def reply(self):
        if self.path.startswith("/api/models/"):
            repo = self.path[len("/api/models/"):].split("/revision")[0].split("?")[0]
            status, headers = 200, {}
            body = {"id": repo, "sha": "0" * 40, "gated": "manual", "siblings": [{"rfilename": "model_index.json"}]}
        else:
            status, headers = 401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model is restricted."}
            body = {"error": "Access to model is restricted. You must have access to it and be authenticated."}
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/json", "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = reply

    def log_message(self, *args):
        pass


@pytest.fixture
def gated_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GatedHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_gated_model_says_what_to_do_in_one_line(gated_hub, inputs, tmp_path):
    image, map_path = inputs
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=gated_hub, HF_HOME=str(tmp_path / "hf-home"), PYTHONUNBUFFERED="1")
    command = [sys.executable, str(REPO_ROOT / SCRIPT), "--device", "cpu", "--image", str(image), "--map",
               str(map_path), "--prompt", "x", "--output", str(tmp_path / "out.png")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {GATED_MODEL} is a gated model: accept its licence at https://huggingface.co/"
                      f"{GATED_MODEL} and log in with `hf auth login`, then run again"], result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("out*.png"))
