"""Checks that the blocks copied between pipeline files are identical to their source; `--fix` rewrites the copies.

    python -m tools.check_copies          # from the repository root; or python tools/check_copies.py from anywhere
    python -m tools.check_copies --fix    # after editing a block in its source file: copy it everywhere

Each pipeline file stands alone, so shared code is copied into it between two marker lines:

    # Copied from SD2/diff_pipe.py: differential core (begin)
    ...
    # Copied from SD2/diff_pipe.py: differential core (end)

The source file carries the same markers. A block is edited in its source only; `--fix` replaces each copy's text
between the markers by the source's. It touches nothing else: files outside a block's set, text outside the markers,
and files whose markers are missing, repeated or out of order (those are reported, to be mended by hand).
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CopiedBlock:
    source: str  # the file that holds the original, relative to the repository root
    name: str
    copies: tuple  # globs of the files that must carry it, the source included

    def files(self, root: Path) -> list:
        return sorted({path for pattern in self.copies for path in root.glob(pattern)})

    def markers(self):
        return tuple(f"# Copied from {self.source}: {self.name} ({end})" for end in ("begin", "end"))


FLOW_FILES = tuple(f"{family}/diff_pipe.py" for family in ("SD3", "Flux", "Chroma", "QwenImage", "ZImage"))
BLOCKS = [
    CopiedBlock("SD2/diff_pipe.py", "release rule", ("SD2/diff_pipe*.py", "SDXL/diff_pipe*.py", "Kandinsky/diff_pipe*.py",
                                                     "IF/diff_pipe*.py")),
    CopiedBlock("SD3/diff_pipe.py", "flow release rule", FLOW_FILES),
    CopiedBlock("SD2/diff_pipe.py", "differential core", ("*/diff_pipe*.py",)),
    CopiedBlock("SD2/diff_pipe.py", "crop to change", ("*/diff_pipe*.py",)),
    CopiedBlock("SD2/diff_pipe.py", "map parsing", ("*/diff_pipe*.py",)),
    CopiedBlock("SD3/diff_pipe.py", "flow crop", FLOW_FILES),
    CopiedBlock("IF/diff_pipe_I.py", "IF helpers", ("IF/diff_pipe*.py",)),
    CopiedBlock("SD2/diff_pipe_inpaint.py", "released mask", ("*/diff_pipe_inpaint.py",)),
]


def block_span(text: str, block: CopiedBlock):
    """(start, end) of the block's text in `text`, from its begin marker to its end marker; or why there is none."""
    begin, end = block.markers()
    if text.count(begin) != 1 or text.count(end) != 1:
        return f"needs the lines {begin!r} and {end!r} once each"
    start, stop = text.index(begin), text.index(end)
    return (start, stop) if start < stop else f"has {end!r} before {begin!r}"


def first_difference(reference: str, copy: str) -> str:
    for number, (expected, found) in enumerate(zip(reference.splitlines(), copy.splitlines()), 1):
        if expected != found:
            return f"line {number} of the block: {found!r} instead of {expected!r}"
    return f"the block has {len(copy.splitlines())} lines instead of {len(reference.splitlines())}"


def read(path: Path) -> str:
    return path.read_bytes().decode("utf-8")  # bytes, so that line endings come back exactly as they were


def check(root: Path, fix: bool = False) -> tuple:
    """Compares every copy with its source; with `fix`, rewrites the copies that differ.

    Returns (problems, fixed): one line per copy that differs or whose markers are wrong (after fixing, only the
    latter), and one line per block rewritten.
    """
    problems, fixed = [], []
    for block in BLOCKS:
        source = read(root / block.source)
        span = block_span(source, block)
        if isinstance(span, str):
            problems.append(f"{block.source} (the source of the {block.name}) {span}")
            continue
        reference = source[span[0] : span[1]]
        for path in block.files(root):
            name = path.relative_to(root).as_posix()
            text = read(path)
            span = block_span(text, block)
            if isinstance(span, str):
                problems.append(f"{name} {span}")
            elif text[span[0] : span[1]] != reference:
                if fix:
                    path.write_bytes((text[: span[0]] + reference + text[span[1] :]).encode("utf-8"))
                    fixed.append(f"{name}: {block.name}")
                else:
                    difference = first_difference(reference, text[span[0] : span[1]])
                    problems.append(f"{name}: its {block.name} differs from {block.source}'s ({difference})")
    return problems, fixed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="store_true", help="rewrite every copy that differs from its source")
    args = parser.parse_args(argv)
    problems, fixed = check(REPO_ROOT, fix=args.fix)
    for block in fixed:
        print(f"rewrote {block}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems and not args.fix:
        print("Edit a block in its source file, then run: python -m tools.check_copies --fix", file=sys.stderr)
    if not problems and not fixed:
        print("every copied block matches its source")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
