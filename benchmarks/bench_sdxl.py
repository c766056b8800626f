"""SDXL: the cost of per-pixel strength, measured side by side with stock img2img in one process.

    python benchmarks/bench_sdxl.py [--size 256] [--steps 20] [--repeats 3] [--device cpu]

The model has SDXL's layout (a plain top UNet level, then cross-attention levels with several transformer layers,
linear projections and the text-and-time added conditioning; a VAE of factor 8) at a small width, with random
weights: nothing is downloaded, and time per step depends on the shapes, not on the weights. Text embeddings are
given, since encoding is the same for both pipelines and runs outside the loop. Besides the cases every benchmark
runs (see bench_sd2.py), it times the base/refiner split at 0.8 against stock's split: one model plays both stages
here, so the difference lies in the handoff, where our refiner encodes the original once more.
"""

import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from SDXL import diff_pipe  # noqa: E402
from tests.tiny_models import build_pipeline, sdxl_components, test_image  # noqa: E402

WIDTHS = (64, 128, 256)
TEXT_WIDTH = 128  # each text encoder's; SDXL: 768 and 1280, side by side, and a pooled 1280
SPLIT = 0.8
SPLIT_CASES = ("stock base + refiner at 0.8", "ours base + refiner, uniform map", "ours base + refiner, gradient map")


def main(argv=None):
    args = harness.bench_parser(__doc__).parse_args(argv)
    harness.quiet_libraries()
    components = sdxl_components(widths=WIDTHS, vae_widths=(32, 64, 64, 64), text_width=TEXT_WIDTH)
    stock = build_pipeline(StableDiffusionXLImg2ImgPipeline, components).to(args.device)
    ours = build_pipeline(diff_pipe.StableDiffusionXLDiffImg2ImgPipeline, components).to(args.device)
    embeds = harness.embeddings((1, 77, 2 * TEXT_WIDTH), args.device)
    pooled = harness.embeddings((1, TEXT_WIDTH), args.device)
    text = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=torch.zeros_like(pooled), guidance_scale=7.5,
                num_inference_steps=args.steps)
    image, maps = test_image(args.size), harness.keep_maps(args.size)

    def split(pipe, **map_arguments):
        refiner_arguments = dict(original_image=image, **map_arguments) if map_arguments else {}

        def run():
            latents = pipe(image=image, strength=1.0, denoising_end=SPLIT, output_type="latent", **map_arguments,
                           generator=torch.Generator().manual_seed(harness.SEED), **text).images
            return pipe(image=latents, denoising_start=SPLIT, output_type="np", **refiner_arguments,
                        generator=torch.Generator().manual_seed(harness.SEED), **text)

        return run

    splits = [split(stock), split(ours, map=maps["ours"]), split(ours, map=maps["ours_gradient"])]
    results = harness.measure_family(
        f"SDXL-shaped UNet {WIDTHS}, {args.size}x{args.size} px", stock, ours, diff_pipe,
        dict(image=image, output_type="np", **text), args.size, args.repeats, args.device,
        extra_cases=dict(zip(SPLIT_CASES, splits)),
    )
    stock_split, our_split = (results[name][harness.clock(args.device)] for name in SPLIT_CASES[:2])
    print(f"base + refiner, uniform map, against stock's split (the same UNet steps): "
          f"{our_split / stock_split - 1:+.1%}")


if __name__ == "__main__":
    main()
