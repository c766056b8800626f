"""Edit a video with Wan 2.1, giving each pixel of each frame its own strength through a map.

    python Wan/run.py                      # the example image in assets/ as a still video, with the default model
    python Wan/run.py --video clip.mp4 --map map.png --prompt "a snowy street" --output edit.mp4
    python Wan/run.py --video clip.mp4 --map maps/ --frames 33      # one map per frame, from a folder of images

The defaults are those of diffusers' `WanVideoToVideoPipeline` and its docstring's example (480x832, 50 steps,
guidance 5, Wan-AI/Wan2.1-T2V-1.3B-Diffusers with UniPC at flow_shift 3, which it recommends for 480p).
"""

import argparse
import json
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli, loading, results, running  # noqa: E402

DEFAULT_MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
SIZE_MULTIPLE = 16  # the VAE's 8 pixels a latent, in the transformer's 2x2 patches
FRAMES_PER_LATENT = 4  # Wan's VAE encodes frame 0 alone, then each group of 4 frames, into one latent frame
DEFAULT_FRAMES, DEFAULT_FPS, DEFAULT_FLOW_SHIFT = 81, 16, 3.0  # stock's frames; Wan 2.1's frame rate; 480p's shift
MAX_FRAMES = 1 + FRAMES_PER_LATENT * 1000  # only guards against typos: far beyond what any GPU holds
VIDEO = True  # it edits videos: tools.batch, tools.fan and the app edit images, and refuse it
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")  # what imageio reads as videos (ffmpeg, Pillow)


def build_parser():
    parser = cli.build_parser(
        "Differential video-to-video with Wan 2.1: a grayscale map, still or one per frame, gives every pixel of every "
        "frame its own strength. --model takes any Wan 2.1 text-to-video checkpoint in diffusers format, as a Hub id "
        "or a local folder. The video is stretched to --width x --height, and Wan's VAE groups its frames (frame 0 "
        "alone, then 4 at a time), so the frames of a group share one strength per pixel, their maps' mean. Wan "
        "samples with flow matching (UniPC on flow sigmas), so --scheduler keeps the model's own.",
        default_model=DEFAULT_MODEL,
        default_steps=50,
        default_guidance=5.0,
    )
    parser.default_output = Path("output.mp4")
    parser.output_holds = "the parameters are stored in the mp4's comment tag"
    parser.map_input = map_input
    flags = parser.common_flags
    flags["image"].help = (f"without --video: a still image, edited as a video of --frames equal frames (default: "
                           f"{cli.display(cli.EXAMPLE_IMAGE)})")
    flags["map"].help = (
        "grayscale map of each pixel's strength, white keeps, black changes fully: an image (a still map for every "
        f"frame), or a video ({', '.join(VIDEO_SUFFIXES)}) or a folder of images (sorted by name), one map per frame "
        f"(default: {cli.display(cli.EXAMPLE_MAP)})")
    flags["mask"].help = ("soft inpainting instead of --map: an image whose white (half its range and up) is the "
                          "region to fill in every frame, feathered into a map by --feather and --grow (default: none)")
    flags["guidance_scale"].help = ("classifier-free guidance against --negative-prompt, two transformer passes per "
                                    "step; 1 or less turns it off (default: %(default)g)")
    flags["output"].metavar = "PATH.mp4"
    flags["output"].help = (
        "mp4 to write (H.264 through imageio-ffmpeg), with the parameters and the command that makes it again as JSON "
        "in its comment tag: `ffmpeg -i PATH.mp4 -f ffmetadata -` shows it (default: the first free output.mp4, "
        "output-1.mp4, ... here)")
    flags["compare"].help = "also write <output>-compare.mp4: input | map | output, frame by frame (default: off)"
    add = parser.groups["inputs"].add_argument
    add("--video", metavar="PATH", help=f"video to edit: {', '.join(VIDEO_SUFFIXES)} or a folder of images (sorted "
        "by name, so number them with leading zeros); its first --frames frames are edited (default: none, --image)")
    add("--frames", type=cli.whole_number(1, MAX_FRAMES), default=DEFAULT_FRAMES, metavar="N",
        help=f"frames to read and edit, 1 + 4k: Wan's VAE encodes frame 0 alone, then 4 at a time (default: "
        f"{DEFAULT_FRAMES})")
    add = parser.groups["sampling"].add_argument
    add("--height", type=multiple_of_16, default=480, metavar="PX", help="height to edit at, a multiple of 16; the "
        "video is stretched to it (default: 480)")
    add("--width", type=multiple_of_16, default=832, metavar="PX", help="width to edit at, a multiple of 16 "
        "(default: 832)")
    add("--flow-shift", type=cli.real_number(0.01, 100), default=DEFAULT_FLOW_SHIFT, metavar="S", help="the "
        "scheduler's shift of its sigmas towards noise: 3 for 480p, 5 for 720p, as stock's example says (default: 3)")
    add = parser.groups["output"].add_argument
    add("--fps", type=cli.real_number(0.1, 1000), metavar="FPS", help=f"frame rate of the written mp4 (default: the "
        f"--video's own, else {DEFAULT_FPS}, Wan 2.1's)")
    parser.checks.append(check_flags)
    return parser


def multiple_of_16(text: str) -> int:
    value = cli.whole_number(SIZE_MULTIPLE, cli.MAX_SIDE)(text.strip()) if text.strip().isdigit() else None
    if value is None or value % SIZE_MULTIPLE:
        raise argparse.ArgumentTypeError(f"must be a multiple of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} to "
                                         f"{cli.MAX_SIDE}, got {text!r}")
    return value


def check_flags(args) -> None:
    if args.frames % FRAMES_PER_LATENT != 1:
        below = args.frames - (args.frames - 1) % FRAMES_PER_LATENT
        raise cli.CliError(f"--frames {args.frames}: Wan's VAE encodes frame 0 alone, then 4 at a time, so it takes "
                           f"1 + 4k frames, and stock drops the frames beyond the last such count; pass --frames "
                           f"{below} or {below + FRAMES_PER_LATENT}")
    if args.video is not None and args.image is not None:
        raise cli.CliError("--video and --image are alternatives: --image is a still image edited as a video; pass "
                           "only one")


def map_input(given, example, flag):
    """--map's path: a video or a folder of frames is checked when it is read; an image, as every run.py checks it."""
    path = None if given is None else Path(given).expanduser()
    if path is not None and holds_frames(path):
        if not path.exists():
            raise cli.CliError(f"{flag} {cli.display(path)}: no such file")
        return path
    return cli.input_path(given, example, flag)


def load_pipelines(args):
    if args.scheduler != "default":
        raise cli.CliError(
            f"--scheduler {args.scheduler} is a sampler for SD 1.x/2.x and SDXL; Wan samples with flow matching: "
            "leave --scheduler default"
        )
    from Wan.diff_pipe import WanDiffVideoToVideoPipeline  # by package, so that families never collide

    pipe = loading.load_pipeline(
        WanDiffVideoToVideoPipeline, args.model, torch_dtype=cli.torch_dtype(args.dtype), device=args.device,
        offload=args.offload,
    )
    if "flow_shift" in pipe.scheduler.config:  # as stock's example sets it; a scheduler without one keeps its own
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=args.flow_shift)
    return pipe


# Reading


def holds_frames(path: Path) -> bool:
    """Whether ``path`` is read as frames (a video file or a folder of images) rather than as one image."""
    return path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES


def frame_rate(args, source_fps: float | None) -> float:
    """The frame rate to write: --fps, else the --video's own, else Wan 2.1's."""
    return args.fps or source_fps or DEFAULT_FPS


def read_frames(path: Path, flag: str, count: int, *, gray: bool = False) -> tuple[list, float | None]:
    """Up to ``count`` frames of a video file or a folder of images (RGB, or maps with ``gray``), and its frame rate
    where the file has one."""
    if path.is_dir():
        files = sorted(file for file in path.iterdir() if file.suffix.lower() in Image.registered_extensions())
        if not files:
            raise cli.CliError(f"{flag} {cli.display(path)}: the folder holds no image files; put the frames there as "
                               "images, sorted by name")
        read = (lambda file: cli.load_map(file, flag)) if gray else (
            lambda file: cli.as_rgb(cli.read_image(file, flag), f"{flag} {cli.display(file)}"))
        return [read(file) for file in files[:count]], None
    import imageio.v2 as imageio

    frames = []
    try:
        with imageio.get_reader(path) as reader:
            meta = reader.get_meta_data()
            for frame in reader:
                frames.append(Image.fromarray(frame).convert("L" if gray else "RGB"))
                if len(frames) == count:
                    break
    except (OSError, ValueError, RuntimeError, IndexError) as error:  # what ffmpeg's and Pillow's readers raise
        reason = "no such file" if isinstance(error, FileNotFoundError) else "cannot read it as a video: " + \
            cli.one_line(error)
        raise cli.CliError(f"{flag} {cli.display(path)}: {reason}") from None
    if not frames:
        raise cli.CliError(f"{flag} {cli.display(path)}: holds no frame; give a video with frames")
    fps = meta.get("fps") or (1000 / meta["duration"] if meta.get("duration") else None)  # a GIF's ms per frame
    return frames, fps


def load_video(args) -> tuple[list, float | None]:
    """The frames to edit (RGB) and their frame rate: --video's first --frames frames, or --image repeated."""
    if args.video is None:
        return [cli.as_rgb(cli.read_image(args.image, "--image"), f"--image {cli.display(args.image)}")] * \
            args.frames, None
    frames, fps = read_frames(args.video, "--video", args.frames)
    if len(frames) < args.frames:
        fits = len(frames) - (len(frames) - 1) % FRAMES_PER_LATENT
        raise cli.CliError(f"--video {cli.display(args.video)} has {len(frames)} frames, fewer than --frames "
                           f"{args.frames}; pass --frames {fits}, the most 1 + 4k it holds")
    return frames, fps


def load_maps(args, frames: list) -> list:
    """The keep maps: one for every frame (a still map or mask), or one per frame; each stretched to --width x
    --height where its shape differs, with one warning where it differs from the video's."""
    size, what = frames[0].size, "mask" if args.mask is not None else "map"
    if args.mask is not None:
        mask = cli.read_image(args.mask, "--mask", gray=True)
        warn_if_stretched(what, mask.size, size)
        maps = [cli.mask_to_keep_map(mask, size, args.feather, args.grow, shown=cli.display(args.mask))]
    elif holds_frames(args.map):
        maps, _ = read_frames(args.map, "--map", args.frames, gray=True)
        if len(maps) not in (1, len(frames)):
            raise cli.CliError(f"--map {cli.display(args.map)} has {len(maps)} frames but the video has "
                               f"{len(frames)}: give one map per frame, or one still map for all of them")
        warn_if_stretched(what, maps[0].size, size)
    else:
        maps = [cli.load_map(args.map)]
        warn_if_stretched(what, maps[0].size, size)
    target = (args.width, args.height)
    return [cli.stretch_map(each, target) if cli.aspect_differs(target, each.size) else each for each in maps]


def warn_if_stretched(what: str, size: tuple, video_size: tuple) -> None:
    if cli.aspect_differs(video_size, size):
        cli.warn(f"the {what} ({size[0]}x{size[1]}) has another shape than the video ({video_size[0]}x"
                 f"{video_size[1]}); it is stretched to fit")


# Editing and writing


def edit(pipe, args, *, video, maps, prompt, negative_prompt, seed):
    """Edits one video (a list of frames) with its maps (one, or one per frame) and the sampling settings in `args`;
    returns (frames, steps run)."""
    (frames,) = running.edit_images(
        pipe,
        args,
        prompt=prompt,
        negative_prompt=negative_prompt or "",
        video=video,
        map=maps[0] if len(maps) == 1 else maps,  # a flat list is one map per frame
        invert_map=args.invert_map,
        strength=args.strength,
        keep_exact=args.keep_exact,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=loading.make_generator(seed),
        output_type="pil",
    )
    return frames, pipe.num_timesteps


def parameters(args, steps_run: int, fps: float, extra_params: dict | None = None) -> dict[str, str]:
    """What the mp4's comment tag holds: every run.py's parameters, Wan's own flags, the frame rate written, and the
    command that makes it again."""
    extra = {"video": args.video, "frames": args.frames, "height": args.height, "width": args.width,
             "flow_shift": args.flow_shift, "fps": json.dumps(fps)}
    extra = {key: value for key, value in extra.items() if value is not None}
    text = results.png_parameters(args, steps_run, {**(extra_params or {}), **extra})
    if args.video is not None:
        del text["image"]  # the example image, which --video stands in for
    return text


def write_video(frames: list, args, *, video: list, maps: list, fps: float, text: dict) -> tuple[Path, Path | None]:
    """Writes the frames as an mp4 with ``text`` (and the --compare video); returns both paths (None: no compare)."""
    output = results.write_mp4(frames, args.output, fps, text, overwrite=args.overwrite)
    if not args.compare:
        return output, None
    size = frames[0].size
    strips = [results.compare_strip(source.resize(size, Image.Resampling.BICUBIC),
                                    cli.as_rgb(maps[index % len(maps)]).resize(size), result, args.invert_map)
              for index, (source, result) in enumerate(zip(video, frames))]
    try:
        return output, results.write_mp4(strips, cli.compare_path(output), fps, text, overwrite=args.overwrite)
    except cli.CliError as error:  # the output is there: a rerun without --overwrite would stop at it
        raise cli.CliError(f"wrote {cli.display(output)}, but not its comparison video: {error}; rerun with "
                           "--overwrite once there is room (or without --compare)", error.exit_code) from error


def run():
    args = cli.parse_args(build_parser())
    if args.video is not None:
        args.video = Path(args.video).expanduser()
        cli.check_output(args.output, {"--video": args.video}, overwrite=True)  # only: is it the video itself
    video, source_fps = load_video(args)
    if cli.aspect_differs((args.width, args.height), video[0].size):
        cli.warn(f"the video ({video[0].width}x{video[0].height}) has another shape than --width x --height "
                 f"({args.width}x{args.height}); it is stretched to fit")
    maps = load_maps(args, video)
    fps = frame_rate(args, source_fps)
    pipe = load_pipelines(args)
    started = time.perf_counter()
    frames, steps_run = edit(pipe, args, video=video, maps=maps, prompt=args.prompt,
                             negative_prompt=args.negative_prompt, seed=args.seed)
    seconds = time.perf_counter() - started
    output, strip = write_video(frames, args, video=video, maps=maps, fps=fps, text=parameters(args, steps_run, fps))
    print(f"{cli.display(output)} ({seconds:.1f}s, {steps_run} denoising step{'' if steps_run == 1 else 's'})"
          + (f"; comparison: {cli.display(strip)}" if strip else ""))


if __name__ == "__main__":
    cli.main(run)
