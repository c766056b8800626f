"""Crop to change: what a small change costs with `tools.crop`, against the same edit on the whole frame.

    python benchmarks/bench_crop.py [--family sd2|sdxl] [--size 512] [--steps 10] [--repeats 3] [--device cpu]

The maps are soft inpainting: a disc that changes fully, feathered by a quarter of its radius, whose changed pixels
(strength above 0) cover 5%, 10% and 25% of the frame. For each, the whole-frame run and the cropped run (32 px of
margin) are timed side by side, alternating, in one process; the denoiser's FLOPs are counted by torch's
FlopCounterMode in a separate pass. The crop's area is the box the rule gives (released cells, margin, size unit).
"Vs proportional" divides the cropped run's cost per step by the crop's share of the frame: 1.0 would be a cost
exactly proportional to the crop's area, and the target is at most 1.2.

The models have SD's and SDXL's layouts at a small width, with random weights, as in bench_sd2.py and
bench_sdxl.py: time per step depends on the shapes, not on the weights. At this width a step has fixed costs (the
time and text embeddings, the cross-attention keys and values, each kernel's launch) that the published models'
spatial work dwarfs, so:

    python benchmarks/bench_crop.py --real-flops

counts the published SD 2.1-base (512 px) and SDXL base (1024 px) UNets' FLOPs per step on the crop, on meta tensors
(shapes only: nothing is allocated or computed), in seconds. `gpu_bench.py` times them on a GPU (its "crop" variant).
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from benchmarks.crop_cases import AREAS, MARGIN, crop_cases, crop_cells, crop_share, soft_inpainting_map  # noqa: E402
from tests.tiny_models import build_pipeline, sd_components, sdxl_components, test_image  # noqa: E402

WIDTHS = (64, 128, 256)
TEXT_WIDTH = 128
TARGET = 1.2  # at most this much above a cost proportional to the crop's area


def family_pipeline(family: str, device, widths=WIDTHS):
    """Ours, on a small model with the family's layout, and the text arguments that stand in for its encoders."""
    if family == "sd2":
        from SD2 import diff_pipe

        components = sd_components(widths=widths, down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                   vae_widths=(32, 64, 64, 64), text_width=TEXT_WIDTH)
        pipe = build_pipeline(diff_pipe.StableDiffusionDiffImg2ImgPipeline, components)
        embeds = harness.embeddings((1, 77, TEXT_WIDTH), device)
        text = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds))
    else:
        from SDXL import diff_pipe

        components = sdxl_components(widths=widths, vae_widths=(32, 64, 64, 64), text_width=TEXT_WIDTH)
        pipe = build_pipeline(diff_pipe.StableDiffusionXLDiffImg2ImgPipeline, components)
        embeds = harness.embeddings((1, 77, 2 * TEXT_WIDTH), device)
        pooled = harness.embeddings((1, TEXT_WIDTH), device)
        text = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds),
                    pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=torch.zeros_like(pooled))
    return diff_pipe, pipe.to(device), text


def real_unet_flops(families=("sd2", "sdxl"), steps: int = 10) -> dict:
    """The published SD 2.1-base (512 px) and SDXL base (1024 px) UNets' FLOPs per step on the crop, as a share of
    the whole frame's, for each map: counted on meta tensors, which carry shapes and nothing else, so nothing is
    allocated or computed. Returns {family: {area: (FLOPs share, crop share)}}."""
    from diffusers import UNet2DConditionModel

    from benchmarks import gpu_bench  # imported here: only --real-flops needs the published configurations
    from SD2 import diff_pipe

    configs = {"sd2": (gpu_bench.SD21_UNET, 512), "sdxl": (gpu_bench.SDXL_UNET, 1024)}
    shares = {}
    for family in families:
        config, size = configs[family]
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)

        def flops(rows, columns):
            with torch.device("meta"):
                inputs = dict(sample=torch.empty(2, 4, rows, columns), timestep=torch.tensor([500, 500]),
                              encoder_hidden_states=torch.empty(2, 77, unet.config.cross_attention_dim))
                if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and six size numbers
                    time_ids, config = gpu_bench.SDXL_TIME_IDS, unet.config
                    pooled = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
                    inputs["added_cond_kwargs"] = dict(text_embeds=torch.empty(2, pooled),
                                                       time_ids=torch.empty(2, time_ids))
            with FlopCounterMode(display=False) as counter:
                unet(**inputs)
            return counter.get_total_flops()

        whole = flops(size // 8, size // 8)
        shares[family] = {}
        for area in AREAS:
            (rows, columns), grid = crop_cells(diff_pipe, soft_inpainting_map(size, area), 8, steps)
            shares[family][area] = (flops(rows, columns) / whole, rows * columns / (grid[0] * grid[1]))
    return shares


def print_real_unet_flops(steps: int) -> None:
    print(f"the published UNets, FLOPs per step on the crop ({MARGIN} px of margin) against the whole frame, counted "
          "on meta tensors")
    print(f"{'model':>22} {'changed':>8} {'crop':>6} {'FLOPs/step':>11} {'FLOPs vs prop.':>15}")
    names = {"sd2": "SD 2.1-base, 512 px", "sdxl": "SDXL base, 1024 px"}
    for family, areas in real_unet_flops(steps=steps).items():
        for area, (flops, share) in areas.items():
            print(f"{names[family]:>22} {area:8.0%} {share:6.1%} {flops:11.3f} {flops / share:15.2f}")


def denoiser_flops(pipe, run) -> float:
    """FLOPs of the denoiser over one run of `run()`."""
    with FlopCounterMode(display=False) as counter:
        run()
    return sum(counter.get_flop_counts()[type(harness.denoiser(pipe)).__name__].values())


def widths_list(text: str) -> tuple:
    widths = tuple(harness.positive_int(width.strip()) for width in text.split(","))
    if len(widths) != len(WIDTHS) or any(width % 32 for width in widths):
        raise argparse.ArgumentTypeError(f"give {len(WIDTHS)} multiples of 32, one per level, not {text!r}")
    return widths


def main(argv=None):
    parser = harness.bench_parser(__doc__, size=512, multiple=64)
    parser.add_argument("--family", choices=["sd2", "sdxl"], default="sd2")
    parser.add_argument("--widths", type=widths_list, default=WIDTHS, metavar="W,W,W",
                        help=f"the UNet's channels per level (default: {','.join(map(str, WIDTHS))})")
    parser.add_argument("--real-flops", action="store_true",
                        help="instead of timing, count the published SD 2.1 and SDXL UNets' FLOPs per step (seconds)")
    args = parser.parse_args(argv)
    harness.quiet_libraries()
    if args.real_flops:
        return print_real_unet_flops(args.steps)
    module, pipe, text = family_pipeline(args.family, args.device, args.widths)
    call = dict(image=test_image(args.size), num_inference_steps=args.steps, guidance_scale=7.5, output_type="np",
                **text)

    print(f"{args.family.upper()}-shaped UNet {args.widths}, {args.size}x{args.size} px, "
          f"{harness.run_description(args.device, args.steps, args.repeats)}")
    print(f"{'changed':>8} {'crop':>6} {'calls':>11} {'time/step':>10} {'FLOPs/step':>11} "
          f"{'time vs prop.':>14} {'FLOPs vs prop.':>15}")
    worst = 0.0
    for area in AREAS:
        keep_map = soft_inpainting_map(args.size, area)
        cases = crop_cases(pipe, keep_map, **call)
        calls = harness.unet_calls_per_case(pipe, cases)
        flops = {name: denoiser_flops(pipe, run) for name, run in cases.items()}
        results = harness.side_by_side(cases, calls, args.repeats, args.device)
        share = crop_share(module, pipe, keep_map, args.steps)
        changed = float((keep_map < 1).mean())
        step_ratio = results["crop"]["step_vs_stock"]
        flop_ratio = (flops["crop"] / calls["crop"]) / (flops["whole frame"] / calls["whole frame"])
        worst = max(worst, step_ratio / share)
        print(f"{changed:8.1%} {share:6.1%} {calls['whole frame']:>5} / {calls['crop']:<3} {step_ratio:10.3f} "
              f"{flop_ratio:11.3f} {step_ratio / share:14.2f} {flop_ratio / share:15.2f}")
    print(f"worst time per step against a cost proportional to the crop: {worst:.2f}x "
          f"({'within' if worst <= TARGET else 'above'} the {TARGET}x target)")


if __name__ == "__main__":
    main()
