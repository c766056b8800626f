"""The edit models of Flux/run.py (--kontext, --fill), QwenImage/run.py (--edit) and Flux2/run.py: a flag for each
variant of a folder, the defaults each variant takes from its stock pipeline, and --reference (docs/edit-models.md).

    python Flux/run.py --kontext --prompt "make it snow" --map map.png --reference style.png
    python Flux/run.py --fill --mask hole.png --feather 32 --prompt "a wooden door"
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path

from tools import cli


@dataclass(frozen=True)
class Variant:
    """One pipeline of a model folder: the flag that picks it (None for the folder's own), and stock's defaults."""
    flag: str | None
    model: str
    steps: int
    guidance: float
    help: str = ""  # what the flag does


def add_variants(parser: cli.Parser, variants: dict[str, Variant]) -> None:
    """A flag for each variant but the folder's own; --model, --steps and --guidance-scale default to the chosen
    variant's (filled in by a check, so that tools.batch reads them the same way)."""
    group = parser.groups["edit models"] = parser.add_argument_group("edit models")
    for variant in variants.values():
        if variant.flag:
            group.add_argument(variant.flag, action="store_true", help=variant.help)
    for name, field, shown in [("model", "model", str), ("steps", "steps", str),
                               ("guidance_scale", "guidance", "{:g}".format)]:
        action = parser.common_flags[name]
        values = {name: getattr(variant, field) for name, variant in variants.items()}
        if len(set(values.values())) == 1:
            continue
        action.default = None
        own = next(name for name, variant in variants.items() if not variant.flag)
        others = "; ".join(f"{variants[name].flag}: {shown(value)}" for name, value in values.items() if name != own)
        action.help = action.help.split(" (default:")[0] + f" (default: {shown(values[own])}; {others})"
    parser.checks.append(functools.partial(check_variant, variants=variants))


def check_variant(args: argparse.Namespace, variants: dict[str, Variant]) -> None:
    chosen = [variant.flag for variant in variants.values() if variant.flag and getattr(args, dest(variant.flag))]
    if len(chosen) > 1:
        raise cli.CliError(f"{' and '.join(chosen)} pick different models: pass one of them")
    picked = variants[chosen_variant(args, variants)]
    for name, value in [("model", picked.model), ("steps", picked.steps), ("guidance_scale", picked.guidance)]:
        if getattr(args, name) is None:
            setattr(args, name, value)


def chosen_variant(args: argparse.Namespace, variants: dict[str, Variant]) -> str:
    """The name of the variant the flags pick: the one whose flag is given, else the folder's own."""
    return next((name for name, variant in variants.items() if variant.flag and getattr(args, dest(variant.flag))),
                next(name for name, variant in variants.items() if not variant.flag))


def dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_reference(parser: cli.Parser, *, needs: str | None = None) -> None:
    """--reference: an image that conditions the edit in place of the image itself, as stock's `image_reference`;
    with ``needs`` (a variant's flag), only with that flag."""
    with_flag = f"with {needs}: " if needs else ""
    parser.groups["inputs"].add_argument(
        "--reference", metavar="PATH", help=f"{with_flag}an image whose content or style the edit takes (stock's "
        "image_reference); the model then reads it instead of --image, which still gives the pixels to edit "
        "(default: none)")

    def check_reference(args: argparse.Namespace) -> None:
        if args.reference is None:
            return
        if needs and not getattr(args, dest(needs)):
            raise cli.CliError(f"--reference conditions the edit of {needs}: pass {needs} too, or drop --reference")
        cli.input_path(args.reference, None, "--reference")
    parser.checks.append(check_reference)


def reference_image(args: argparse.Namespace):
    """The --reference image as upright RGB, or None."""
    if args.reference is None:
        return None
    return cli.as_rgb(cli.read_image(Path(args.reference), "--reference"), f"--reference {cli.display(args.reference)}")
