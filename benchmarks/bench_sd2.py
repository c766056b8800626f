"""SD 1.x/2.x: the cost of per-pixel strength, measured side by side with stock img2img in one process.

    python benchmarks/bench_sd2.py [--size 256] [--steps 20] [--repeats 3] [--device cpu]

The model has SD's layout (cross-attention on all UNet levels but the deepest, a VAE of factor 8) at a small width,
with random weights: nothing is downloaded, and time per step depends on the shapes, not on the weights. Text
embeddings are given, since encoding is the same for both pipelines and runs outside the loop. It runs stock
img2img at strength 1, and ours with a uniform map (the same work as stock), a gradient map (the blend busy at every
step) and a map whose strongest pixel is 0.3 (floor(0.3 T) UNet calls, where the authors' code runs all T), and
prints UNet calls, times, ratios to stock per run and per UNet step, peak memory, and the differential work itself
(map preparation and the per-step blend) timed inside a gradient-map run.
"""

import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionImg2ImgPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from SD2 import diff_pipe  # noqa: E402
from tests.tiny_models import build_pipeline, sd_components, test_image  # noqa: E402

WIDTHS = (64, 128, 256)
TEXT_WIDTH = 256  # SD 2.x: 1024 (OpenCLIP-H)


def main(argv=None):
    args = harness.bench_parser(__doc__).parse_args(argv)
    harness.quiet_libraries()
    components = sd_components(widths=WIDTHS, down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                               vae_widths=(32, 64, 64, 64), text_width=TEXT_WIDTH)
    stock = build_pipeline(StableDiffusionImg2ImgPipeline, components).to(args.device)
    ours = build_pipeline(diff_pipe.StableDiffusionDiffImg2ImgPipeline, components).to(args.device)
    embeds = harness.embeddings((1, 77, TEXT_WIDTH), args.device)
    inputs = dict(image=test_image(args.size), prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds),
                  guidance_scale=7.5, num_inference_steps=args.steps, output_type="np")
    harness.measure_family(f"SD-shaped UNet {WIDTHS}, {args.size}x{args.size} px", stock, ours, diff_pipe, inputs,
                           args.size, args.repeats, args.device)


if __name__ == "__main__":
    main()
