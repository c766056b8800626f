"""SD 1.x/2.x: the cost of per-pixel strength, measured side by side with stock img2img in one process.

    python benchmarks/bench_sd2.py [--size 256] [--steps 20] [--repeats 3] [--device cpu]

The model has SD's architecture at a small width with random weights (nothing is downloaded): time per step
depends on the shapes, not on the weights. It prints
  * the overhead against stock img2img doing the same work (a uniform map of strength 1, and a gradient map that
    keeps the blend busy at every step),
  * UNet calls and time for a map whose strongest pixel is 0.3, against running all T steps as the authors' code
    does (whose per-step cost is stock's at strength 1),
  * peak memory of each case.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import UNetCalls, compare, mib  # noqa: E402
from SD2.diff_pipe import StableDiffusionDiffImg2ImgPipeline  # noqa: E402

TEXT_WIDTH = 256


def small_sd_components():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256), layers_per_block=2, sample_size=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    # Text encoding is the same for both pipelines and outside the loop: pass embeddings instead.
    return dict(unet=unet, vae=vae, text_encoder=None, tokenizer=None, scheduler=scheduler, safety_checker=None,
                feature_extractor=None, image_encoder=None, requires_safety_checker=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps T (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per case (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args()

    components = small_sd_components()
    stock = StableDiffusionImg2ImgPipeline(**components).to(args.device)
    ours = StableDiffusionDiffImg2ImgPipeline(**components).to(args.device)
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    calls = UNetCalls(components["unet"])

    size, steps = args.size, args.steps
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    embeds = torch.randn(1, 77, TEXT_WIDTH, generator=torch.Generator().manual_seed(0)).to(args.device)
    common = dict(image=image, prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds),
                  guidance_scale=7.5, num_inference_steps=steps, output_type="np")
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    uniform = np.zeros((size, size), np.float32)
    gradient = np.linspace(0, 1, size, dtype=np.float32)[None].repeat(size, 0)  # strength 1 at the left, 0 at the right
    weak = np.where(gradient < 0.5, 0.7, 1.0).astype(np.float32)  # strength 0.3 on the left half, 0 on the right

    cases = {
        "stock img2img, strength 1": lambda: stock(strength=1.0, generator=seed(), **common),
        "ours, uniform map, strength 1": lambda: ours(map=uniform, generator=seed(), **common),
        "ours, gradient map 0..1": lambda: ours(map=gradient, generator=seed(), **common),
        "ours, map with max strength 0.3": lambda: ours(map=weak, generator=seed(), **common),
    }
    unet_calls = {}
    for name, run in cases.items():
        calls.count = 0
        run()
        unet_calls[name] = calls.count
    results = compare(cases, repeats=args.repeats, device=args.device)

    # On a shared CPU, wall time swings with the other processes' load; this process's CPU time does not.
    measure = "seconds" if args.device.startswith("cuda") else "cpu_seconds"
    baseline = results["stock img2img, strength 1"][measure]
    print(f"SD-shaped UNet (64, 128, 256), {size}x{size} px, T = {steps}, CFG on, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} alternating rounds; ratios of {measure}")
    print(f"{'case':36} {'UNet calls':>10} {'wall s':>8} {'CPU s':>8} {'vs stock':>9} {'peak memory':>12}")
    for name, result in results.items():
        print(f"{name:36} {unet_calls[name]:>10} {result['seconds']:>8.3f} {result['cpu_seconds']:>8.3f} "
              f"{result[measure] / baseline:>9.3f} {mib(result['peak_bytes']):>12}")
    per_step = lambda name: results[name][measure] / unet_calls[name]  # noqa: E731
    stock_step = per_step("stock img2img, strength 1")
    print(f"overhead per UNet step, uniform map:  {per_step('ours, uniform map, strength 1') / stock_step - 1:+.1%}")
    print(f"overhead per UNet step, gradient map: {per_step('ours, gradient map 0..1') / stock_step - 1:+.1%}")
    weak = "ours, map with max strength 0.3"
    print(f"max strength 0.3: {unet_calls[weak]} UNet calls against {steps} for all steps (the authors' code); "
          f"time ratio {results[weak][measure] / baseline:.2f}")

if __name__ == "__main__":
    main()
