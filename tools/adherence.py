"""Adherence report: how much each pixel of an edit changed, against the strength its map asked for.

    python -m tools.adherence --image input.jpg --map map.png --output edit.png --chart adherence.png
    python path/to/tools/adherence.py ...      # the same, from any folder

It bins the pixels by requested strength (``--strength * (1 - map)``, or ``map`` itself under ``--invert-map``) and
prints, per bin, the realized change: the mean absolute difference between output and input (mean over RGB, on the
0-255 scale) and, where the optional ``lpips`` package is installed, the mean of LPIPS's spatial distance map. It
then prints the Spearman rank correlation between requested strength and realized change over all pixels (ties
get their average rank): 1 means more strength never gave less change.

Sizes. The output is the reference grid:
  * the map is stretched to the output's size (area-averaged when it shrinks, bilinear when it grows), as the
    pipelines stretch it, with a warning if its aspect ratio differs;
  * an input whose size differs from the output's but whose aspect ratio is the same within 1% (pipelines round
    sizes to multiples of 8 or 64) is resized to the output's size (Lanczos), with a warning; that resampling adds a
    little change of its own;
  * an input of another aspect ratio is an error: it is not the picture the output was made from.

``--chart PATH.png`` draws the per-bin means with PIL: requested strength on the x axis, realized change (mean
absolute difference) on the y axis. Existing files are never replaced without ``--overwrite``.

Exit status: 0 done, 2 bad arguments or input files.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if __package__ in (None, ""):  # started as a script path (python tools/adherence.py): make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import cli, results  # noqa: E402

DEFAULT_BINS = 10
MAX_BINS = 100
CHART_SIZE = (800, 500)


class BinRow(NamedTuple):
    """One bin of requested strength, ``low <= s < high`` (the last bin includes 1)."""

    low: float
    high: float
    pixels: int
    requested: float  # mean requested strength of its pixels (nan when empty)
    change: float  # mean absolute difference, 0-255 (nan when empty)
    lpips: float | None = None  # mean LPIPS distance (None without lpips, nan when empty)


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` (flattened), tied values sharing the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(values, kind="stable")
    _, first_index, counts = np.unique(values[order], return_index=True, return_counts=True)
    # Tied values occupy positions first .. first + count - 1, whose mean 1-based rank is first + (count + 1) / 2.
    group_rank = first_index + (counts + 1) / 2
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, counts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of two equally long samples: Pearson's correlation of their average ranks.

    Returns nan when either sample is constant (the correlation is undefined) or has fewer than two values.
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"spearman needs samples of equal length, got {x.size} and {y.size}")
    if x.size < 2:
        return math.nan
    rank_x, rank_y = average_ranks(x), average_ranks(y)
    rank_x -= rank_x.mean()
    rank_y -= rank_y.mean()
    spread = math.sqrt(float(rank_x @ rank_x) * float(rank_y @ rank_y))
    if spread == 0:
        return math.nan
    return float(np.clip(rank_x @ rank_y / spread, -1.0, 1.0))


def bin_table(requested: np.ndarray, change: np.ndarray, bins: int = DEFAULT_BINS,
              lpips_map: np.ndarray | None = None) -> list[BinRow]:
    """Per-bin means of ``change`` (and ``lpips_map``) over ``bins`` equal bins of ``requested`` strength in [0, 1]."""
    requested, change = np.asarray(requested, np.float64).ravel(), np.asarray(change, np.float64).ravel()
    lpips_values = None if lpips_map is None else np.asarray(lpips_map, np.float64).ravel()
    # A strength on an edge belongs to the bin above it; 1e-9 keeps 0.3 * 10 = 2.9999999999999996 in bin 3.
    index = np.clip(np.floor(requested * bins + 1e-9).astype(np.int64), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)

    def means(values):
        sums = np.bincount(index, weights=values, minlength=bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            return sums / counts

    requested_means, change_means = means(requested), means(change)
    lpips_means = means(lpips_values) if lpips_values is not None else [None] * bins
    return [
        BinRow(k / bins, (k + 1) / bins, int(counts[k]), float(requested_means[k]), float(change_means[k]),
               None if lpips_means[k] is None else float(lpips_means[k]))
        for k in range(bins)
    ]


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def requested_strength(map_image: Image.Image, size: tuple[int, int], *, invert_map: bool = False,
                       strength: float = 1.0) -> np.ndarray:
    """Each pixel's requested strength (float64, shape (height, width) of ``size``): ``strength * (1 - map)``."""
    keep = Image.fromarray(cli.map_values(map_image))
    if keep.size != tuple(size):
        shrinking = size[0] < keep.width or size[1] < keep.height
        keep = keep.resize(tuple(size), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)
    keep = np.clip(np.asarray(keep, dtype=np.float64), 0.0, 1.0)
    return strength * (keep if invert_map else 1.0 - keep)


def realized_change(image: Image.Image, output: Image.Image) -> np.ndarray:
    """Per-pixel mean absolute difference over R, G and B on the 0-255 scale (float64, shape (height, width))."""
    before = np.asarray(image.convert("RGB"), dtype=np.float64)
    after = np.asarray(output.convert("RGB"), dtype=np.float64)
    return np.abs(after - before).mean(axis=-1)


def lpips_distance_map(image: Image.Image, output: Image.Image) -> np.ndarray | None:
    """LPIPS (AlexNet) spatial distance per pixel, or None when the optional ``lpips`` package is unavailable."""
    try:
        import lpips
        import torch
    except ImportError:
        return None
    try:
        metric = lpips.LPIPS(net="alex", spatial=True, verbose=False)
        with torch.no_grad():
            distance = metric(_lpips_tensor(image), _lpips_tensor(output))
    except Exception as error:  # its backbone weights may need a download; the report stands without LPIPS
        cli.warn(f"LPIPS is installed but could not run, so it is left out: {error}")
        return None
    distance = distance.detach().float().cpu().numpy().reshape(distance.shape[-2:])
    if distance.shape != (output.height, output.width):
        resized = Image.fromarray(distance.astype(np.float32)).resize(output.size, Image.Resampling.BILINEAR)
        distance = np.asarray(resized)
    return distance.astype(np.float64)


def _lpips_tensor(image: Image.Image):
    import torch

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # LPIPS takes [-1, 1]
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


def load_triple(args: argparse.Namespace) -> tuple[Image.Image, Image.Image, Image.Image]:
    """(input, map, output) with the input on the output's grid; see the module docstring for sizes."""
    image = cli.as_rgb(cli.read_image(args.image, "--image"))
    map_image = cli.load_map(args.map)
    output = cli.as_rgb(cli.read_image(args.output, "--output"))
    sizes = {name: f"{picture.width}x{picture.height}" for name, picture in
             (("image", image), ("map", map_image), ("output", output))}
    if image.size != output.size:
        if cli.aspect_differs(image.size, output.size):
            raise cli.CliError(f"--output {cli.display(args.output)} is {sizes['output']} but --image "
                               f"{cli.display(args.image)} is {sizes['image']}, another shape: pass the input that "
                               "this output was edited from")
        cli.warn(f"the input ({sizes['image']}) is resized to the output's size ({sizes['output']}); the resampling "
                 "adds a little change of its own")
        image = image.resize(output.size, Image.Resampling.LANCZOS)
    if cli.aspect_differs(output.size, map_image.size):
        cli.warn(f"the map ({sizes['map']}) has another shape than the output ({sizes['output']}); it is stretched "
                 "to fit")
    return image, map_image, output


# ---------------------------------------------------------------------------------------------------------------
# Report


def format_report(rows: list[BinRow], rho: float) -> str:
    """The table and the rank correlation, as printed."""
    with_lpips = any(row.lpips is not None for row in rows)
    header = f"{'requested strength':<20}{'pixels':>10}{'mean requested':>16}{'mean |change|':>15}"
    header += f"{'LPIPS':>9}" if with_lpips else ""
    lines = [header, "-" * len(header)]
    for row in rows:
        line = f"{row.low:.2f} to {row.high:.2f}{'':<8}{row.pixels:>10}"
        if row.pixels == 0:
            line += f"{'-':>16}{'-':>15}" + (f"{'-':>9}" if with_lpips else "")
        else:
            line += f"{row.requested:>16.3f}{row.change:>15.2f}" + (f"{row.lpips:>9.4f}" if with_lpips else "")
        lines.append(line)
    lines.append("mean |change| is the mean absolute difference over R, G and B, on the 0-255 scale"
                 + ("; LPIPS is AlexNet's spatial distance" if with_lpips else " (LPIPS: install the lpips package)"))
    if math.isnan(rho):
        lines.append("Spearman rank correlation: undefined (the requested strength, or the change, is the same "
                     "everywhere)")
    else:
        lines.append(f"Spearman rank correlation, requested strength vs realized change, over all pixels: {rho:.4f}")
    return "\n".join(lines)


def draw_chart(rows: list[BinRow], rho: float = math.nan, size: tuple[int, int] = CHART_SIZE) -> Image.Image:
    """A line chart of the per-bin means: requested strength (x, 0 to 1) against mean |change| (y, from 0)."""
    width, height = size
    chart = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(chart)
    font = ImageFont.load_default(size=max(10, height // 36))
    left, right, top, bottom = int(width * 0.12), int(width * 0.96), int(height * 0.1), int(height * 0.84)
    filled = [row for row in rows if row.pixels > 0]
    y_top = _nice_ceiling(max([row.change for row in filled], default=0.0))

    def x_at(value):
        return left + value * (right - left)

    def y_at(value):
        return bottom - value / y_top * (bottom - top)

    for tick in np.linspace(0, 1, 11):
        draw.line([(x_at(tick), bottom), (x_at(tick), bottom + 5)], fill="black")
        draw.text((x_at(tick), bottom + 8), f"{tick:.1f}", fill="black", font=font, anchor="mt")
    for tick in np.linspace(0, y_top, 6):
        draw.line([(left, y_at(tick)), (right, y_at(tick))], fill=(225, 225, 225))
        draw.text((left - 8, y_at(tick)), f"{tick:g}", fill="black", font=font, anchor="rm")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)

    points = [(x_at(row.requested), y_at(row.change)) for row in filled]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=3)
    for x, y in points:
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=(31, 119, 180), outline="black")

    draw.text(((left + right) / 2, height - 6), "requested strength", fill="black", font=font, anchor="md")
    title = "Realized change per bin of requested strength"
    if not math.isnan(rho):
        title += f"  (Spearman rank correlation {rho:.3f})"
    draw.text(((left + right) / 2, top / 2), title, fill="black", font=font, anchor="mm")
    _draw_vertical_text(chart, "realized change: mean |output - input| (0-255)", (font.size, (top + bottom) / 2), font)
    return chart


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``value`` (1 for nothing to show)."""
    if not value > 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 2.5, 5, 10) if step * power >= value)


def _draw_vertical_text(chart: Image.Image, text: str, centre: tuple[float, float], font) -> None:
    left, top, right, bottom = font.getbbox(text)
    label = Image.new("RGB", (right - left + 4, bottom - top + 4), "white")
    ImageDraw.Draw(label).text((2 - left, 2 - top), text, fill="black", font=font)
    label = label.rotate(90, expand=True)
    chart.paste(label, (int(centre[0] - label.width / 2), int(centre[1] - label.height / 2)))


# ---------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m tools.adherence",
        description="How closely an edit follows its map: realized change per bin of requested strength, and the "
        "Spearman rank correlation between the two.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The output is the reference grid: the map is stretched to it, and an input of the same aspect ratio "
        "is resized to it;\nan input of another aspect ratio is an error. Exit status: 0 done, 2 bad arguments or "
        "input files.",
    )
    parser.add_argument("--image", required=True, metavar="PATH", help="the input image that was edited (required)")
    parser.add_argument("--map", required=True, metavar="PATH",
                        help="the map the edit used: white keeps, black changes fully (required)")
    parser.add_argument("--output", required=True, metavar="PATH", help="the edited image (required)")
    parser.add_argument("--invert-map", action="store_true",
                        help="the map was read the other way round, white = change (default: off)")
    parser.add_argument("--strength", type=cli.real_number(0, 1), default=1.0, metavar="S",
                        help="the global --strength the edit used (default: 1)")
    parser.add_argument("--bins", type=cli.whole_number(1, MAX_BINS), default=DEFAULT_BINS, metavar="N",
                        help=f"bins of requested strength, 1 to {MAX_BINS} (default: {DEFAULT_BINS})")
    parser.add_argument("--chart", metavar="PATH.png", help="also draw the chart into this PNG (default: none)")
    parser.add_argument("--chart-size", type=_chart_size, default=CHART_SIZE, metavar="WxH",
                        help=f"chart size in pixels (default: {CHART_SIZE[0]}x{CHART_SIZE[1]})")
    parser.add_argument("--overwrite", action="store_true", help="allow replacing an existing --chart (default: off)")
    return parser


def _chart_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        size = int(width), int(height)
    except ValueError:
        size = None
    if size is None or not all(200 <= n <= 8000 for n in size):
        raise argparse.ArgumentTypeError(f"must be WIDTHxHEIGHT, each 200 to 8000 pixels, got {text!r}")
    return size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    for flag in ("image", "map", "output"):
        setattr(args, flag, cli.input_path(getattr(args, flag), None, f"--{flag}"))
    if args.chart is not None:
        args.chart = Path(args.chart).expanduser()
        if args.chart.suffix.lower() != ".png" or not args.chart.parent.is_dir():
            raise cli.CliError(f"--chart {args.chart}: give a .png file in an existing folder")
        inputs = {f"--{flag}": getattr(args, flag) for flag in ("image", "map", "output")}
        cli.check_output(args.chart, inputs, overwrite=args.overwrite, flag="--chart")
    return args


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    image, map_image, output = load_triple(args)
    requested = requested_strength(map_image, output.size, invert_map=args.invert_map, strength=args.strength)
    change = realized_change(image, output)
    rows = bin_table(requested, change, args.bins, lpips_distance_map(image, output))
    rho = spearman(requested, change)
    print(format_report(rows, rho))
    if args.chart is not None:
        written = results.write_png(draw_chart(rows, rho, args.chart_size), args.chart, overwrite=args.overwrite)
        print(f"chart: {cli.display(written)}")


def main(argv: list[str] | None = None) -> None:
    cli.main(lambda: run(argv))


if __name__ == "__main__":
    main()
