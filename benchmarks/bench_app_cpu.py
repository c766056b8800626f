"""The web app's CPU start settings, timed: one press of Edit on the page as it starts on a CPU, at the model's size.

    python benchmarks/bench_app_cpu.py                      # SD 2.1-base, app.CPU_STEPS steps at app.CPU_SIDE px
    python benchmarks/bench_app_cpu.py --steps 10 --side 256 --repeats 3
    python benchmarks/bench_app_cpu.py --family sdxl --steps 2    # SDXL base, without the refiner

On a CPU, app.py starts its page at CPU_STEPS steps and a working size of CPU_SIDE pixels, and says how long an edit
then takes. This builds the family's published configuration (UNet, VAE and text encoders, from gpu_bench.py) with
random weights in fp32, nothing downloaded: time depends on the shapes, not on the weights. It hands the pipeline to the
app as the model it loaded at start, and runs the page's own Edit function on the page's start values: the example image
and prompts, the sampler the model ships (SD 2.1: PNDM, which calls the UNet once more than its steps; SDXL: Euler), and
a map painted black over the left half, which changes those pixels fully, so that every step runs. It prints the
settings, the seconds that the page reports (the denoising call) and the whole press (image, map, PNG) for each repeat:
the first is the one a visitor waits for after the app starts. SDXL runs without its refiner (--no-refiner: in fp32 the
refiner's 2.3 B parameters, 9 GB, do not fit beside the base in 24 GiB), at the size that SDXL/run.py edits whatever the
working size (about 1024 x 1024 pixels in area).
"""

import argparse
import contextlib
import resource
import sys
import time
from pathlib import Path

import torch
from diffusers import PNDMScheduler
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import app  # noqa: E402
from benchmarks import gpu_bench, harness  # noqa: E402
from tests.tiny_models import clip_text_model, clip_tokenizer  # noqa: E402
from tools import cli, loading  # noqa: E402

CLIP_VOCABULARY = 49408  # every CLIP text encoder's; the tokenizer here is a tiny one, whose ids lie within it
# stabilityai/stable-diffusion-2-1-base, text_encoder/config.json: gpu_bench's widths, with its activation.
SD21_TEXT_ENCODER = {**gpu_bench.SD21_TEXT_ENCODER, "hidden_act": "gelu"}
# stabilityai/stable-diffusion-xl-base-1.0, text_encoder/config.json (CLIP-L) and text_encoder_2/config.json
# (OpenCLIP-bigG).
SDXL_TEXT_ENCODER = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                     "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}
SDXL_TEXT_ENCODER_2 = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                       "num_hidden_layers": 32, "max_position_embeddings": 77, "hidden_act": "gelu",
                       "projection_dim": 1280}
FLAGS = {"sd2": ["--device", "cpu"], "sdxl": ["--device", "cpu", "--no-refiner"]}  # the app's start command


def text_encoder(config: dict, tokenizer, smoke: bool, projection: bool = False, smoke_width: int = 32):
    """A CLIP text encoder of ``config`` (smoke: the tests' tiny one of ``smoke_width``), random weights, eval mode."""
    if smoke:
        return clip_text_model(tokenizer, with_projection=projection, hidden_size=smoke_width)
    torch.manual_seed(harness.SEED)
    config = {key: value for key, value in config.items() if key != "architectures"}
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    return model_class(CLIPTextConfig(vocab_size=CLIP_VOCABULARY, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                      **config)).eval().requires_grad_(False)


def sd2_pipelines(smoke: bool):
    from SD2.diff_pipe import StableDiffusionDiffImg2ImgPipeline

    components = gpu_bench.sd2_components(gpu_bench.Setup("cpu", torch.float32, smoke=smoke, steps=0))
    tokenizer = clip_tokenizer()
    components.update(tokenizer=tokenizer, text_encoder=text_encoder(SD21_TEXT_ENCODER, tokenizer, smoke),
                      scheduler=gpu_bench.build_scheduler(PNDMScheduler, gpu_bench.SD21_SCHEDULER))  # as it ships
    return StableDiffusionDiffImg2ImgPipeline(**components)


def sdxl_pipelines(smoke: bool):
    from SDXL.diff_pipe import StableDiffusionXLDiffImg2ImgPipeline

    components = gpu_bench.sdxl_components(gpu_bench.Setup("cpu", torch.float32, smoke=smoke, steps=0))
    tokenizer = clip_tokenizer()
    components.update(tokenizer=tokenizer, tokenizer_2=tokenizer,
                      text_encoder=text_encoder(SDXL_TEXT_ENCODER, tokenizer, smoke),
                      text_encoder_2=text_encoder(SDXL_TEXT_ENCODER_2, tokenizer, smoke, projection=True))
    return loading.load_family("sdxl").Pipelines(StableDiffusionXLDiffImg2ImgPipeline(**components), None)


BUILDERS = {"sd2": sd2_pipelines, "sdxl": sdxl_pipelines}


@contextlib.contextmanager
def loaded_at_start(family: str, pipelines):
    """The family's ``load_pipelines`` hands over ``pipelines``, as if the app had loaded them from a checkpoint."""
    module = loading.load_family(family)
    load_pipelines, module.load_pipelines = module.load_pipelines, lambda args: pipelines
    try:
        yield
    finally:
        module.load_pipelines = load_pipelines


def painted_left_half(side: int) -> dict:
    """The page's map editor after a visitor paints the left half black (change fully): what its Edit reads."""
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    layer.paste((0, 0, 0, 255), (0, 0, side // 2, side))
    return {"background": None, "layers": [layer], "composite": None}


def page_values(function, overrides: dict) -> list:
    """What the page sends to ``function`` as it starts: each input's start value, ``overrides`` by elem_id."""
    return [overrides.get(component.elem_id, component.value) for component in function.inputs]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(BUILDERS), default=app.DEFAULT_FAMILY,
                        help=f"the app's start family (default {app.DEFAULT_FAMILY})")
    parser.add_argument("--steps", type=harness.positive_int, default=app.CPU_STEPS,
                        help=f"the page's steps (default app.CPU_STEPS, {app.CPU_STEPS})")
    parser.add_argument("--side", type=harness.positive_int, default=app.CPU_SIDE,
                        help=f"the page's working size, the longer side in pixels (default app.CPU_SIDE, "
                        f"{app.CPU_SIDE})")
    parser.add_argument("--repeats", type=harness.positive_int, default=2, help="edits, one after another (default 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny models of the same blocks, to test the script")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    harness.quiet_libraries()
    started = time.perf_counter()
    pipelines = BUILDERS[args.family](args.smoke)
    built = time.perf_counter() - started
    pipes = [pipe for pipe in (pipelines if isinstance(pipelines, tuple) else [pipelines]) if pipe is not None]
    parameters = sum(gpu_bench.parameter_count(module) for pipe in pipes for module in pipe.components.values()
                     if isinstance(module, torch.nn.Module))
    start_args = app.family_args(args.family, FLAGS[args.family])
    print(f"{args.family}: {'tiny configs' if args.smoke else 'published config'}, {parameters / 1e9:.2f} B "
          f"parameters in fp32, built in {built:.0f} s; CPU, {torch.get_num_threads()} threads")
    sampler = type(pipes[0].scheduler).__name__
    print(f"page: {args.steps} steps, working size {args.side} px, the example image and prompts, the left half "
          f"painted black, guidance {start_args.guidance_scale:g}, the model's sampler ({sampler})")
    models = app.Models(args.family, start_args)
    with loaded_at_start(args.family, pipelines), app.app_folder() as folder:
        models.get(args.family, start_args)  # as the app does before it serves
        edit = next(function for function in app.build_app(models, folder).fns.values() if function.name == "edit")
        values = page_values(edit, {"image-file": str(cli.EXAMPLE_IMAGE), "map-source": "paint",
                                    "map-editor": painted_left_half(args.side), "max-side": args.side,
                                    "steps": args.steps})
        for _ in range(args.repeats):
            calls, started = harness.count_unet_calls(pipes[0]), time.perf_counter()
            pair, _, _, summary, written, values[-1] = edit.fn(*values)  # the last: the page's count of results
            seconds = time.perf_counter() - started
            calls.stop()
            assert Path(written).is_file()
            print(f"{summary.replace('**', '')}, {len(calls)} UNet calls, at {'x'.join(map(str, pair[1].size))} px; "
                  f"the whole press {seconds:.1f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"peak resident memory {peak:.1f} GiB")


if __name__ == "__main__":
    main()
