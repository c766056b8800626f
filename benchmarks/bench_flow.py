"""Flow-matching families: the cost of per-pixel strength, measured side by side with stock img2img in one process.

    python benchmarks/bench_flow.py --family {sd3,flux,chroma,qwenimage,zimage,flux_kontext,flux_fill,
                                    qwenimage_edit,flux2_klein}
                                    [--size 256] [--steps 20] [--repeats 3] [--device cpu]

Each family's transformer keeps its real block types (SD3's MMDiT, FLUX.1's and Chroma's double- and single-stream
blocks, Qwen-Image's MMDiT, Z-Image's single-stream blocks with refiners) at a small width, over a VAE of the real
factor 8, with random weights: nothing is downloaded, and time per step depends on the shapes, not on the weights.
The text encoders are the tests' tiny ones, run once per call by both pipelines, outside the loop. Each family
guides as its published model does (FLUX.1-dev is guidance-distilled, Z-Image-Turbo runs without CFG; the others
double the batch of every transformer call). The cases and the figures printed are those of every benchmark (see
bench_sd2.py), except that a map whose strongest pixel is 0.3 costs ceil(0.3 T) transformer calls here: flow-matching
img2img runs ceil(T s) steps at strength s, where SD runs floor(T s). The edit models' inpainting pipelines (FLUX.1
Kontext, ...) and FLUX.1 Fill are measured against stock with an all-white mask, which repaints what a uniform map
does.
"""

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from diffusers import (
    ChromaImg2ImgPipeline,
    Flux2KleinInpaintPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxKontextInpaintPipeline,
    QwenImageEditInpaintPipeline,
    QwenImageImg2ImgPipeline,
    StableDiffusion3Img2ImgPipeline,
    ZImageImg2ImgPipeline,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from Chroma import diff_pipe as chroma_pipe  # noqa: E402
from Flux import diff_pipe as flux_pipe  # noqa: E402
from Flux import diff_pipe_fill as fill_pipe  # noqa: E402
from Flux import diff_pipe_kontext as kontext_pipe  # noqa: E402
from Flux2 import diff_pipe as klein_pipe  # noqa: E402
from QwenImage import diff_pipe as qwenimage_pipe  # noqa: E402
from QwenImage import diff_pipe_edit as qwenimage_edit_pipe  # noqa: E402
from SD3 import diff_pipe as sd3_pipe  # noqa: E402
from tests.edit_models import flux2_klein_components  # noqa: E402
from tests.fill_models import flux_fill_components  # noqa: E402
from tests.flow_models import flux_components, sd3_components  # noqa: E402
from tests.flow_models2 import chroma_components, qwenimage_components, zimage_components  # noqa: E402
from tests.qwen_edit_models import qwenimage_edit_components, small_working_area  # noqa: E402
from tests.tiny_models import build_pipeline, test_image  # noqa: E402
from ZImage import diff_pipe as zimage_pipe  # noqa: E402

HEADS, HEAD_DIM = 4, 64  # a width of 256; the published models have 1536 (SD3.5-medium) to 3840 (Z-Image)
VAE_WIDTHS = (16, 32, 32, 32)  # 4 levels: factor 8, as every published flow VAE
WIDTH = dict(heads=HEADS, head_dim=HEAD_DIM)
PROMPT = "a red apple on a table"
TEXT_LENGTH = 32  # max_sequence_length: T5 or Qwen tokens (SD3 adds CLIP's 77)
CFG = "CFG on"


@dataclass
class FlowFamily:
    title: str
    stock_class: type
    module: object  # the pipeline file
    pipeline_class: str
    components: Callable  # () -> the shared components
    guidance: dict  # the family's guidance arguments
    guidance_note: str  # how it guides, for the heading
    inputs: dict = field(default_factory=dict)  # what else both take
    mask: bool = False  # an inpainting pipeline: stock takes an all-white mask where ours takes the map
    working_area: Callable = lambda area: contextlib.nullcontext()  # sets stock's own working area, where it has one


FAMILIES = {
    "sd3": FlowFamily("SD3-shaped MMDiT, 2 layers", StableDiffusion3Img2ImgPipeline, sd3_pipe,
                      "StableDiffusion3DiffImg2ImgPipeline",
                      lambda: sd3_components(layers=2, vae_widths=VAE_WIDTHS, **WIDTH),
                      dict(negative_prompt="", guidance_scale=7.0), CFG),
    "flux": FlowFamily("FLUX.1-shaped transformer, 1 double + 2 single blocks", FluxImg2ImgPipeline, flux_pipe,
                       "FluxDiffImg2ImgPipeline",
                       lambda: flux_components(layers=1, single_layers=2, vae_widths=VAE_WIDTHS, **WIDTH),
                       dict(guidance_scale=3.5), "guidance-distilled, no CFG"),
    "chroma": FlowFamily("Chroma-shaped transformer, 1 double + 2 single blocks", ChromaImg2ImgPipeline, chroma_pipe,
                         "ChromaDiffImg2ImgPipeline",
                         lambda: chroma_components(layers=1, single_layers=2, vae_widths=VAE_WIDTHS, **WIDTH),
                         dict(negative_prompt="", guidance_scale=5.0), CFG),
    "qwenimage": FlowFamily("Qwen-Image-shaped MMDiT, 2 layers", QwenImageImg2ImgPipeline, qwenimage_pipe,
                            "QwenImageDiffImg2ImgPipeline",
                            lambda: qwenimage_components(layers=2, vae_levels=len(VAE_WIDTHS), **WIDTH),
                            dict(negative_prompt=" ", true_cfg_scale=4.0), "true CFG on"),
    "zimage": FlowFamily("Z-Image-shaped transformer, 2 + 1 refiner blocks", ZImageImg2ImgPipeline, zimage_pipe,
                         "ZImageDiffImg2ImgPipeline",
                         lambda: zimage_components(layers=2, refiner_layers=1, vae_widths=VAE_WIDTHS, **WIDTH),
                         dict(guidance_scale=0.0), "no CFG (as Z-Image-Turbo)"),
    "flux_kontext": FlowFamily("FLUX.1 Kontext inpainting, FLUX.1-shaped transformer, 1 double + 2 single blocks",
                               FluxKontextInpaintPipeline, kontext_pipe, "FluxKontextDiffInpaintPipeline",
                               lambda: flux_components(layers=1, single_layers=2, vae_widths=VAE_WIDTHS, **WIDTH),
                               dict(guidance_scale=3.5), "guidance-distilled, no CFG; the source as tokens",
                               inputs=dict(_auto_resize=False), mask=True),
    "flux_fill": FlowFamily("FLUX.1 Fill, FLUX.1-shaped transformer, 1 double + 2 single blocks", FluxFillPipeline,
                            fill_pipe, "FluxDiffFillPipeline",
                            lambda: flux_fill_components(layers=1, single_layers=2, vae_widths=VAE_WIDTHS, **WIDTH),
                            dict(guidance_scale=30.0), "guidance-distilled, no CFG; reads mask and masked image",
                            mask=True),
    # Stock Qwen-Image-Edit works at about 1024 x 1024 px whatever it is given: here at --size px, stock and ours alike.
    "qwenimage_edit": FlowFamily("Qwen-Image-Edit inpainting, Qwen-Image-shaped MMDiT, 2 layers",
                                 QwenImageEditInpaintPipeline, qwenimage_edit_pipe, "QwenImageEditDiffInpaintPipeline",
                                 lambda: qwenimage_edit_components(layers=2, vae_levels=len(VAE_WIDTHS), **WIDTH),
                                 dict(negative_prompt=" ", true_cfg_scale=4.0), "true CFG on; the source as tokens",
                                 mask=True, working_area=small_working_area),
    "flux2_klein": FlowFamily("FLUX.2 [klein] inpainting, FLUX.2-shaped transformer, 1 double + 2 single blocks",
                              Flux2KleinInpaintPipeline, klein_pipe, "Flux2KleinDiffInpaintPipeline",
                              lambda: flux2_klein_components(layers=1, single_layers=2, vae_widths=VAE_WIDTHS,
                                                             **WIDTH),
                              dict(guidance_scale=4.0), "CFG on (the base model)",
                              inputs=dict(text_encoder_out_layers=(1,)), mask=True),
}


def main(argv=None):
    parser = harness.bench_parser(__doc__, multiple=16)
    parser.add_argument("--family", required=True, choices=FAMILIES, help="which flow-matching family to measure")
    args = parser.parse_args(argv)
    harness.quiet_libraries()
    family = FAMILIES[args.family]
    components = family.components()
    stock = build_pipeline(family.stock_class, components).to(args.device)
    ours = build_pipeline(getattr(family.module, family.pipeline_class), components).to(args.device)
    inputs = dict(prompt=PROMPT, image=test_image(args.size), height=args.size, width=args.size,
                  max_sequence_length=TEXT_LENGTH, num_inference_steps=args.steps, output_type="np", **family.guidance,
                  **family.inputs)
    white = dict(mask_image=Image.new("L", (args.size, args.size), 255)) if family.mask else None
    with family.working_area(args.size * args.size):
        harness.measure_family(f"{family.title}, width {HEADS * HEAD_DIM}, VAE factor 8, {args.size}x{args.size} px",
                               stock, ours, family.module, inputs, args.size, args.repeats, args.device,
                               guidance=family.guidance_note, stock_inputs=white)


if __name__ == "__main__":
    main()
