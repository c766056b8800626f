"""benchmarks/gpu_bench.py: its --smoke run (the GPU code path on tiny CPU models, every family), configs and errors."""

import json
import math

import pytest
import torch
from conftest import run_script

from benchmarks import gpu_bench
from tools.cli import CliError

SCRIPT = "benchmarks/gpu_bench.py"
# T = 5 makes the weak map's 0.3 T = 1.5: the flow-matching families must run ceil(1.5) = 2 steps, the others 1.
STEPS = 5
PIPELINE_FILES = {
    "sd2": "SD2/diff_pipe.py", "sdxl": "SDXL/diff_pipe.py", "kandinsky": "Kandinsky/diff_pipe.py",
    "if1": "IF/diff_pipe_I.py", "if2": "IF/diff_pipe_II.py", "sd3": "SD3/diff_pipe.py", "flux": "Flux/diff_pipe.py",
    "flux-kontext": "Flux/diff_pipe_kontext.py", "flux-fill": "Flux/diff_pipe_fill.py",
    "flux2-klein": "Flux2/diff_pipe.py", "wan": "Wan/diff_pipe.py", "chroma": "Chroma/diff_pipe.py",
    "qwenimage": "QwenImage/diff_pipe.py", "qwenimage-edit": "QwenImage/diff_pipe_edit.py",
    "zimage": "ZImage/diff_pipe.py",
    "sd15-controlnet": "SD2/diff_pipe_controlnet.py", "sdxl-controlnet": "SDXL/diff_pipe_controlnet.py",
    "sd2-inpaint": "SD2/diff_pipe_inpaint.py", "sdxl-inpaint": "SDXL/diff_pipe_inpaint.py",
}
FLOW_FAMILIES = ["sd3", "flux", "flux-kontext", "flux-fill", "flux2-klein", "chroma", "qwenimage", "qwenimage-edit",
                 "zimage"]
# Chroma's CFG and Qwen-Image's true CFG run the negative prompt as a second transformer call in every step.
CALLS_PER_STEP = {"chroma": 2, "qwenimage": 2, "qwenimage-edit": 2, "flux2-klein": 2, "wan": 2}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of every family (the default) at T = STEPS; returns (process, report)."""
    report_path = tmp_path_factory.mktemp("gpu_bench") / "smoke.json"
    process = run_script(SCRIPT, "--smoke", "--steps", STEPS, "--json", report_path)
    assert process.returncode == 0, process.stderr
    return process, json.loads(report_path.read_text())


def test_the_script_knows_every_pipeline_file_and_the_families_option_names_the_choices():
    assert {name: family.pipeline_file for name, family in gpu_bench.FAMILIES.items()} == PIPELINE_FILES
    assert gpu_bench.parse_families("if,sd2") == ["if1", "if2", "sd2"]
    assert gpu_bench.parse_families("all") == list(PIPELINE_FILES)
    choices = ", ".join([*PIPELINE_FILES, "if", "all"])
    with pytest.raises(CliError, match=f"unknown family 'sd4'; choose from {choices}"):
        gpu_bench.parse_families("sd2,sd4")


def test_smoke_reports_every_family_with_positive_times_03_t_steps_of_model_calls_and_sd_crops(smoke):
    process, report = smoke
    assert list(report["families"]) == list(PIPELINE_FILES)
    assert report["smoke"] is True and report["dtype"] == "float32" and report["steps"] == STEPS
    for name, family in report["families"].items():
        assert family["dtype"] == "float32"
        eager = family["variants"]["eager"]
        assert eager["status"] == "ok", name
        assert set(eager["cases"]) == {"stock", "ours", "ours_weak"}
        for case in eager["cases"].values():
            assert case["seconds"] > 0 and case["steps_per_second"] > 0
            assert case["peak_bytes"] >= 0 and case["total_peak_bytes"] > 0
        assert eager["cases"]["stock"]["vs_stock"] == 1
        assert family["parameters"]["transformer" if name in [*FLOW_FAMILIES, "wan"] else "unet"] > 0
        assert f"{name} {gpu_bench.size_label(family['size'])}px" in process.stdout
        weak = (math.ceil if name in FLOW_FAMILIES else math.floor)(STEPS * 0.3)
        assert family["weak_steps"] == weak == (2 if name in FLOW_FAMILIES else 1), name
        calls = CALLS_PER_STEP.get(name, 1)
        assert family["unet_calls"] == {"stock": STEPS * calls, "ours": STEPS * calls, "ours_weak": weak * calls}, name
        for case_name, case in eager["cases"].items():
            assert case["unet_calls"] == family["unet_calls"][case_name]
        # --smoke skips offload and compile, and says so.
        assert family["variants"]["offload"] == family["variants"]["compile"] == {"status": "skipped (--smoke)"}
        # The caches beside stock text-to-image, for FLUX.1 and Qwen-Image: T steps each, the cache reusing inside.
        caches = family["variants"].get("caches")
        assert (caches is not None) == (name in ("flux", "qwenimage")), name
        for config in (caches or {"configs": {}})["configs"].values():
            assert {case: result["unet_calls"] for case, result in config.items()} == {
                "stock_text_to_image": STEPS * calls, "ours": STEPS * calls, "ours_gradient": STEPS * calls}
        if not gpu_bench.FAMILIES[name].crop:  # crop to change is measured for SD2 and SDXL on each share of the frame
            assert "crop" not in family["variants"], name
            continue
        crop = family["variants"]["crop"]
        assert crop["status"] == "ok" and list(crop["areas"]) == ["5%", "10%", "25%"]
        for area in crop["areas"].values():
            whole, cropped = area["cases"]["whole frame"], area["cases"]["crop"]
            assert whole["unet_calls"] == cropped["unet_calls"] > 0
            assert 0 < area["crop_share"] <= 1
            assert area["vs_proportional"] == pytest.approx(cropped["step_vs_stock"] / area["crop_share"])
        assert "x proportional" in process.stdout
    assert {name for name, family in gpu_bench.FAMILIES.items() if family.crop} == {"sd2", "sdxl"}


def test_flow_families_round_weak_steps_up_and_the_others_down():
    # At T = 25 the weak map's 0.3 T = 7.5: SD's img2img runs 7 steps, flow-matching img2img runs 8. A product within
    # 1e-4 of an integer is that integer (0.3 x 20 is 6.000000000000001 in floats).
    for name, family in gpu_bench.FAMILIES.items():
        flow = name in FLOW_FAMILIES
        assert family.flow_matching == flow
        assert family.steps_run(25, 0.3) == (8 if flow else 7), name
        assert family.steps_run(20, 0.3) == 6, name
        # Wan 2.1 rounds as SD (stock keeps the last int(T s) steps) and runs in bf16 as the flow families.
        assert family.dtype == (torch.bfloat16 if flow or name == "wan" else torch.float16)


def test_smoke_builds_the_real_blocks_at_a_tiny_size():
    # The smoke overrides change widths and depths only: the block types and conditioning stay the real ones.
    unet = {"down_block_types", "up_block_types", "mid_block_type", "addition_embed_type", "in_channels"}
    transformer = {"patch_size", "all_patch_size", "in_channels", "out_channels", "z_dim", "dim_mult",
                   "guidance_embeds", "qk_norm", "temperal_downsample"}
    for real_name, smoke_name, structure in [
        ("SD21_UNET", "SMOKE_SD21_UNET", unet), ("SDXL_UNET", "SMOKE_SDXL_UNET", unet),
        ("SD15_UNET", "SMOKE_SD21_UNET", unet), ("SD2_INPAINT_UNET", "SMOKE_SD21_UNET", unet),
        ("SDXL_INPAINT_UNET", "SMOKE_SDXL_UNET", unet), ("KANDINSKY22_UNET", "SMOKE_KANDINSKY22_UNET", unet),
        ("IF_I_XL_UNET", "SMOKE_IF_I_UNET", unet), ("IF_II_L_UNET", "SMOKE_IF_II_UNET", unet),
        ("SD35_MEDIUM_TRANSFORMER", "SMOKE_SD35_TRANSFORMER", transformer),
        ("FLUX_DEV_TRANSFORMER", "SMOKE_FLUX_TRANSFORMER", transformer),
        ("CHROMA_HD_TRANSFORMER", "SMOKE_CHROMA_TRANSFORMER", transformer),
        ("QWEN_IMAGE_TRANSFORMER", "SMOKE_QWEN_IMAGE_TRANSFORMER", transformer),
        ("Z_IMAGE_TURBO_TRANSFORMER", "SMOKE_Z_IMAGE_TRANSFORMER", transformer),
        ("QWEN_IMAGE_VAE", "SMOKE_QWEN_IMAGE_VAE", transformer),
    ]:
        real, smoke_overrides = getattr(gpu_bench, real_name), getattr(gpu_bench, smoke_name)
        assert set(smoke_overrides) <= set(real) and not structure & set(smoke_overrides), real_name
        if structure is unet:
            assert len(smoke_overrides["block_out_channels"]) == len(real["block_out_channels"])


def test_real_configs_controlnets_and_inpainting_unets_have_the_published_sizes():
    # Built on the meta device (no memory): the counts the model cards give, within 3 %.
    unet_class = gpu_bench.UNet2DConditionModel
    published = [  # SD 2.1's and SD 1.5's are the released UNets' exact counts
        (unet_class, gpu_bench.SD21_UNET, 865.9e6), (unet_class, gpu_bench.SD15_UNET, 859.5e6),
        (unet_class, gpu_bench.SDXL_UNET, 2.567e9), (unet_class, gpu_bench.KANDINSKY22_UNET, 1.22e9),
        (gpu_bench.VQModel, gpu_bench.KANDINSKY22_MOVQ, 67e6), (unet_class, gpu_bench.IF_I_XL_UNET, 4.3e9),
        (unet_class, gpu_bench.IF_II_L_UNET, 1.2e9),
        # SD3.5-medium's card counts its position table (384 x 384 x 1536, a buffer) with the weights: 2.47 B.
        (gpu_bench.SD3Transformer2DModel, gpu_bench.SD35_MEDIUM_TRANSFORMER, 2.5e9),
        (gpu_bench.FluxTransformer2DModel, gpu_bench.FLUX_DEV_TRANSFORMER, 12e9),
        (gpu_bench.ChromaTransformer2DModel, gpu_bench.CHROMA_HD_TRANSFORMER, 8.9e9),
        (gpu_bench.QwenImageTransformer2DModel, gpu_bench.QWEN_IMAGE_TRANSFORMER, 20e9),
        (gpu_bench.ZImageTransformer2DModel, gpu_bench.Z_IMAGE_TURBO_TRANSFORMER, 6e9),
    ]
    for model_class, config, expected in published:
        with torch.device("meta"):
            model = model_class.from_config(gpu_bench.model_config(config, {}, smoke=False))
        count = gpu_bench.parameter_count(model) + sum(buffer.numel() for buffer in model.buffers())
        assert count == pytest.approx(expected, rel=0.03), config["_class_name"]
    # SD 1.5's canny ControlNet has 361 M parameters, SDXL's 1.25 B (2.5 GB in fp16); an inpainting UNet is its
    # base with a 9-channel input.
    for unet_config, expected in [(gpu_bench.SD15_UNET, 361e6), (gpu_bench.SDXL_UNET, 1.251e9)]:
        with torch.device("meta"):
            unet = gpu_bench.UNet2DConditionModel.from_config(gpu_bench.model_config(unet_config, {}, smoke=False))
            controlnet = gpu_bench.ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=gpu_bench.CONTROLNET_CONDITIONING_WIDTHS,
                load_weights_from_unet=False)
        assert gpu_bench.parameter_count(controlnet) == pytest.approx(expected, rel=0.01)
    for inpaint, base in [(gpu_bench.SD2_INPAINT_UNET, gpu_bench.SD21_UNET),
                          (gpu_bench.SDXL_INPAINT_UNET, gpu_bench.SDXL_UNET)]:
        assert inpaint == {**base, "in_channels": 9}


def test_embeddings_have_the_shapes_the_real_text_encoders_give():
    # The inputs read the embedding widths from the UNet config; for the real models these are the encoders' widths.
    assert gpu_bench.SD21_UNET["cross_attention_dim"] == gpu_bench.SD21_TEXT_ENCODER["hidden_size"] == 1024
    clip_l, clip_big_g = gpu_bench.SDXL_TEXT_ENCODERS.values()
    assert gpu_bench.SDXL_UNET["cross_attention_dim"] == clip_l["hidden_size"] + clip_big_g["hidden_size"] == 2048
    time_ids = gpu_bench.SDXL_TIME_IDS * gpu_bench.SDXL_UNET["addition_time_embed_dim"]
    assert gpu_bench.SDXL_UNET["projection_class_embeddings_input_dim"] == time_ids + clip_big_g["projection_dim"]
    assert gpu_bench.KANDINSKY22_UNET["encoder_hid_dim"] == gpu_bench.KANDINSKY22_IMAGE_ENCODER["projection_dim"]
    for unet in (gpu_bench.IF_I_XL_UNET, gpu_bench.IF_II_L_UNET):
        assert unet["encoder_hid_dim"] == gpu_bench.T5_XXL["d_model"] == 4096
    for transformer in (gpu_bench.SD35_MEDIUM_TRANSFORMER, gpu_bench.FLUX_DEV_TRANSFORMER,
                        gpu_bench.CHROMA_HD_TRANSFORMER):
        assert transformer["joint_attention_dim"] == gpu_bench.T5_XXL["d_model"]
    pooled_clips = clip_l["hidden_size"] + clip_big_g["projection_dim"]  # SD3.5 reads both pooled CLIP outputs
    assert gpu_bench.SD35_MEDIUM_TRANSFORMER["pooled_projection_dim"] == pooled_clips == 2048
    assert gpu_bench.FLUX_DEV_TRANSFORMER["pooled_projection_dim"] == clip_l["hidden_size"]
    assert gpu_bench.QWEN_IMAGE_TRANSFORMER["joint_attention_dim"] == gpu_bench.QWEN25_VL_7B["hidden_size"] == 3584
    assert gpu_bench.Z_IMAGE_TURBO_TRANSFORMER["cap_feat_dim"] == gpu_bench.QWEN3_4B["hidden_size"] == 2560


def test_offload_variant_runs_and_hands_the_next_variant_plain_pipelines(monkeypatch):
    # --smoke skips offload; the same code runs here on the CPU, where offloading moves nothing but installs the
    # hooks all the same. The compile variant, next, must find the modules free of them.
    seen = {}

    def inspect_instead_of_compiling(unet, cases):
        seen["hooked"] = []
        for run in cases.values():  # a plain call must not offload again: both pipelines forgot their hooks
            run()
            seen["hooked"].append(any(hasattr(module, "_hf_hook") for module in unet.modules()))
        return "did not compile: inspected instead"

    monkeypatch.setattr(gpu_bench, "compile_unet", inspect_instead_of_compiling)
    setup = gpu_bench.Setup(device="cpu", dtype=torch.float32, smoke=True, steps=5)
    plan = {"eager": "skipped (not under test)", "offload": None, "compile": None, "crop": "skipped (--no-crop)"}
    record = gpu_bench.run_family(gpu_bench.FAMILIES["sd2"], setup, repeats=1, plan=plan)
    offload = record["variants"]["offload"]
    assert offload["status"] == "ok"
    unet_calls = {name: case["unet_calls"] for name, case in offload["cases"].items()}
    assert unet_calls == {"stock": 5, "ours": 5, "ours_weak": 1}
    assert record["variants"]["compile"] == {"status": "did not compile: inspected instead"}
    assert seen == {"hooked": [False, False, False]}


def test_a_failed_compile_is_reported_in_one_line_and_undone():
    module = torch.nn.Linear(2, 2)

    def fails():
        raise RuntimeError("backend exploded\nwith a long story")

    assert gpu_bench.compile_unet(module, {"stock": fails}) == "did not compile: RuntimeError: backend exploded"
    assert module._compiled_call_impl is None


def test_missing_pipeline_file_is_an_error_naming_it():
    family = gpu_bench.Family("sdxl", "SDXL", "SDXL/nowhere.py", "StableDiffusionXLDiffImg2ImgPipeline",
                              "StableDiffusionXLImg2ImgPipeline", 1024, 64, None, None)
    with pytest.raises(CliError, match=r"SDXL/nowhere\.py is missing: the sdxl benchmark needs "):
        gpu_bench.load_pipeline_class(family)


def test_json_is_never_overwritten_without_overwrite_and_without_a_gpu_it_points_to_smoke(tmp_path, monkeypatch,
                                                                                            capsys):
    existing = tmp_path / "results.json"
    existing.write_text("the user's file")
    monkeypatch.setattr(gpu_bench, "quiet_libraries", lambda: None)
    monkeypatch.setattr("sys.argv", [SCRIPT, "--smoke", "--families", "sd2", "--json", str(existing)])
    with pytest.raises(SystemExit) as exit:
        gpu_bench.main(gpu_bench.run)
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --json {existing} already exists; pass --overwrite to replace it, or another path."
    ]
    assert existing.read_text() == "the user's file"
    # Without a GPU it points to --smoke.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = gpu_bench.build_parser().parse_args(["--families", "sd2"])
    assert args.steps == 20 and not args.smoke  # the defaults; the smoke fixture passes its own T
    with pytest.raises(CliError, match=r"no CUDA GPU here: .*--smoke"):
        gpu_bench.check_args(args)
