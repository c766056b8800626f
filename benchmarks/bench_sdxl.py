"""SDXL: the cost of per-pixel strength, measured side by side with stock img2img in one process.

    python benchmarks/bench_sdxl.py [--size 256] [--steps 20] [--repeats 3] [--device cpu]

The model has SDXL's architecture (a DownBlock2D level, then cross-attention levels with several transformer layers,
linear projections and the text-and-time added conditioning) at a small width with random weights (nothing is
downloaded): time per step depends on the shapes, not on the weights. It prints
  * the overhead against stock img2img doing the same work (a uniform map of strength 1, and a gradient map that
    keeps the blend busy at every step),
  * UNet calls and time for a map whose strongest pixel is 0.3, against running all T steps as the authors' code
    does (whose per-step cost is stock's at strength 1),
  * the same for the base/refiner split at 0.8, against stock's split (one model plays both stages here: the
    overhead lies in the handoff, where the refiner encodes the original once more, not in the model; with a
    uniform map both run the same UNet steps),
  * peak memory of each case.
On a CPU, the ratios are of process CPU time (wall time is printed too): on a machine shared with other work, wall
time swings with the load.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import UNetCalls, compare, mib  # noqa: E402
from SDXL.diff_pipe import StableDiffusionXLDiffImg2ImgPipeline  # noqa: E402

TEXT_WIDTH = 256  # SDXL: 2048, both text encoders' hidden states side by side
POOLED_WIDTH = 128  # SDXL: 1280, the second text encoder's pooled projection
TIME_EMBED = 32  # SDXL: 256 per added time id (original size, crop, target size: 6 numbers)
SPLIT = 0.8


def small_sdxl_components():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256), layers_per_block=2, sample_size=32, attention_head_dim=(2, 4, 8),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), use_linear_projection=True, cross_attention_dim=TEXT_WIDTH,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + POOLED_WIDTH,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1, scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    # Text encoding is the same for both pipelines and outside the loop: pass embeddings instead.
    return dict(unet=unet, vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                scheduler=scheduler, image_encoder=None, feature_extractor=None, requires_aesthetics_score=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps T (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per case (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args()

    components = small_sdxl_components()
    stock = StableDiffusionXLImg2ImgPipeline(**components).to(args.device)
    ours = StableDiffusionXLDiffImg2ImgPipeline(**components).to(args.device)
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    calls = UNetCalls(components["unet"])

    size, steps = args.size, args.steps
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 77, TEXT_WIDTH, generator=generator).to(args.device)
    pooled = torch.randn(1, POOLED_WIDTH, generator=generator).to(args.device)
    common = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=torch.zeros_like(pooled), guidance_scale=7.5,
                  num_inference_steps=steps)
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    uniform = np.zeros((size, size), np.float32)
    gradient = np.linspace(0, 1, size, dtype=np.float32)[None].repeat(size, 0)  # strength 1 at the left, 0 at the right
    weak = np.where(gradient < 0.5, 0.7, 1.0).astype(np.float32)  # strength 0.3 on the left half, 0 on the right

    def stock_split():
        latents = stock(image=image, strength=1.0, denoising_end=SPLIT, output_type="latent", generator=seed(),
                        **common).images
        return stock(image=latents, denoising_start=SPLIT, output_type="np", generator=seed(), **common)

    def our_split(keep_map):
        latents = ours(image=image, map=keep_map, denoising_end=SPLIT, output_type="latent", generator=seed(),
                       **common).images
        return ours(image=latents, original_image=image, map=keep_map, denoising_start=SPLIT, output_type="np",
                    generator=seed(), **common)

    cases = {
        "stock img2img, strength 1": lambda: stock(image=image, strength=1.0, generator=seed(), output_type="np",
                                                   **common),
        "ours, uniform map, strength 1": lambda: ours(image=image, map=uniform, generator=seed(), output_type="np",
                                                      **common),
        "ours, gradient map 0..1": lambda: ours(image=image, map=gradient, generator=seed(), output_type="np",
                                                **common),
        "ours, map with max strength 0.3": lambda: ours(image=image, map=weak, generator=seed(), output_type="np",
                                                        **common),
        "stock base + refiner at 0.8": stock_split,
        "ours base + refiner, uniform map": lambda: our_split(uniform),
        "ours base + refiner, gradient map": lambda: our_split(gradient),
    }
    unet_calls = {}
    for name, run in cases.items():
        calls.count = 0
        run()
        unet_calls[name] = calls.count
    # On a CPU shared with other work, wall time swings with the load; the process's CPU time does not.
    cpu_seconds = {name: [] for name in cases}
    results = compare({name: cpu_timed(run, cpu_seconds[name]) for name, run in cases.items()},
                      repeats=args.repeats, device=args.device, warmup=1)
    for name, result in results.items():
        result["cpu_seconds"] = statistics.median(cpu_seconds[name][1:])  # without the warm-up run
    clock = "cpu_seconds" if args.device == "cpu" else "seconds"
    seconds = lambda name: results[name][clock]  # noqa: E731

    baseline = seconds("stock img2img, strength 1")
    print(f"SDXL-shaped UNet (64, 128, 256), {size}x{size} px, T = {steps}, CFG on, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} alternating rounds; "
          f"ratios of {'CPU' if clock == 'cpu_seconds' else 'wall'} time")
    print(f"{'case':36} {'UNet calls':>10} {'wall s':>8} {'CPU s':>8} {'vs stock':>9} {'peak memory':>12}")
    for name, result in results.items():
        print(f"{name:36} {unet_calls[name]:>10} {result['seconds']:>8.3f} {result['cpu_seconds']:>8.3f} "
              f"{seconds(name) / baseline:>9.3f} {mib(result['peak_bytes']):>12}")
    per_step = lambda name: seconds(name) / unet_calls[name]  # noqa: E731
    uniform_overhead = seconds("ours, uniform map, strength 1") / baseline - 1
    split_overhead = seconds("ours base + refiner, uniform map") / seconds("stock base + refiner at 0.8") - 1
    gradient_overhead = per_step("ours, gradient map 0..1") / per_step("stock img2img, strength 1") - 1
    print(f"overhead, uniform map (the same UNet steps as stock):             {uniform_overhead:+.1%}")
    print(f"overhead, base + refiner, uniform map (the same UNet steps):      {split_overhead:+.1%}")
    print(f"overhead per UNet step, gradient map (fixed costs over fewer steps): {gradient_overhead:+.1%}")
    print(f"max strength 0.3: {unet_calls['ours, map with max strength 0.3']} UNet calls against {steps} for all steps "
          f"(the authors' code); time ratio {seconds('ours, map with max strength 0.3') / baseline:.2f}")


def cpu_timed(run, record):
    """`run`, appending the process time each call takes to `record`."""

    def timed():
        started = time.process_time()
        run()
        record.append(time.process_time() - started)

    return timed

if __name__ == "__main__":
    main()
