"""Checks that the code copied between pipeline files is identical to its source; `--fix` rewrites the copies.

    python -m tools.check_copies          # from the repository root; or python tools/check_copies.py from anywhere
    python -m tools.check_copies --fix    # after editing a block or an object in its source file: copy it everywhere

Each pipeline file stands alone, so shared code is copied into it, marked in one of two ways.

A block: the lines between two marker lines, which the source file carries too.

    # Copied from SD2/diff_pipe.py: differential core (begin)
    ...
    # Copied from SD2/diff_pipe.py: differential core (end)

An object, as diffusers marks them: one comment directly above a def or class (above its decorators, or between
them and the def), which names the source file and the object's dotted name there, and optionally renames:

    # Copied from Flux/diff_pipe.py:FluxDiffImg2ImgPipeline._unchanged with Flux->Chroma, flux->chroma
    def _unchanged(self, ...):

The copy is the def or class with its decorators and body, up to the next line at the same or a lower indentation;
it must equal the source object's text after the renames (applied all at once, to every occurrence, also inside
longer names) and after moving it to the copy's indentation. Only the copy carries the marker.

Code is edited in its source only; `--fix` replaces each copy's text by the source's, in the copy's line endings
(copies are compared regardless of them). It touches nothing else: files outside a block's set, text outside a
block's markers or a copied object, and copies whose markers are missing, repeated, out of order, stand over no def,
or name a source that is not there, and files that are not UTF-8, mix CRLF and LF endings, or are read-only (those are
reported, to be mended by hand). A file is rewritten all at once: written beside it, then renamed over it.
"""

import argparse
import ast
import itertools
import os
import re
import stat
import sys
import tempfile
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
EDIT_FILES = ("Flux/diff_pipe_kontext.py", "QwenImage/diff_pipe_edit.py", "Flux2/diff_pipe.py")
# The files whose denoiser can take diffusers' caches (a transformer with CacheMixin).
CACHE_FILES = ("Flux/diff_pipe.py", "Chroma/diff_pipe.py", "QwenImage/diff_pipe.py", "Flux/diff_pipe_fill.py",
               "Wan/diff_pipe.py", *EDIT_FILES)
BLOCKS = [
    CopiedBlock("SD2/diff_pipe.py", "release rule",
                ("SD2/diff_pipe*.py", "SDXL/diff_pipe*.py", "Kandinsky/diff_pipe*.py", "IF/diff_pipe*.py")),
    CopiedBlock("SD3/diff_pipe.py", "flow release rule", FLOW_FILES + EDIT_FILES + ("Flux/diff_pipe_fill.py",)),
    CopiedBlock("Flux/diff_pipe_kontext.py", "edit inpainting helpers", EDIT_FILES),
    CopiedBlock("Flux/diff_pipe.py", "denoiser caches", CACHE_FILES),
    CopiedBlock("SD2/diff_pipe.py", "differential core", ("*/diff_pipe*.py",)),
    CopiedBlock("SD2/diff_pipe.py", "map parsing", ("*/diff_pipe*.py",)),
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


def first_difference(reference: str, copy: str, what: str = "block", width: int = 60) -> str:
    """The first line where `copy` differs from `reference`, both texts shown around where they part."""
    # split on "\n" alone, so that a difference in "\r" or any other line break shows
    lines = itertools.zip_longest(reference.split("\n"), copy.split("\n"))
    number, expected, found = next((number, *pair) for number, pair in enumerate(lines, 1) if pair[0] != pair[1])
    column = len(os.path.commonprefix([expected or "", found or ""]))
    longest = max(len(expected or ""), len(found or ""))
    start = 0 if longest <= width else max(0, column - width // 3)  # both from one column, so that they line up

    def shown(line):
        if line is None:
            return f"the end of the {what}"
        piece = repr(line[start : start + width])
        return ("..." if start else "") + piece + ("..." if start + width < len(line) else "")

    return f"line {number} of the {what}: {shown(found)} instead of {shown(expected)}"


class FileProblem(Exception):
    """A file that cannot be read or rewritten; the message is one line that names it and what to do."""


def read(path: Path, name: str) -> str:
    try:
        data = path.read_bytes()  # bytes, so that line endings come back exactly as they were
    except FileNotFoundError:
        raise FileProblem(f"there is no {name}") from None
    except OSError as error:
        raise FileProblem(f"cannot read {name} ({error.strerror}): make it readable") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line, byte = data.count(b"\n", 0, error.start) + 1, data[error.start]
        raise FileProblem(f"{name}:{line}: byte 0x{byte:02x} is not UTF-8: save the file as UTF-8") from None
    if "\r\n" in text and "\n" in text.replace("\r\n", ""):  # a fix could write neither ending without a guess
        raise FileProblem(f"{name} mixes CRLF and LF line endings: give it one (e.g. dos2unix {name} or unix2dos), "
                          "then run the check again")
    return text


def readable(paths, root: Path, problems: list):
    """(path, name relative to `root`, text) of each file in `paths` that reads; one that does not is a problem."""
    for path in paths:
        name = path.relative_to(root).as_posix()
        try:
            text = read(path, name)
        except FileProblem as problem:
            problems.append(str(problem))
            continue
        yield path, name, text


def write(path: Path, name: str, text: str):
    """Replaces the file's text all at once, keeping its permissions, so that it is never found half-written."""
    mode = path.stat().st_mode
    if not os.access(path, os.W_OK) or not mode & 0o222:  # the mode bits too: root may write to anything
        raise FileProblem(f"{name} is read-only: make it writable (e.g. chmod u+w {name}), then run --fix again")
    target = path.resolve()  # through a link, so that the link stays one
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        with os.fdopen(handle, "wb") as file:
            file.write(text.encode("utf-8"))
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, stat.S_IMODE(mode))
        os.replace(temporary, target)
    except OSError as error:
        raise FileProblem(f"cannot write {name} ({error.strerror}), so it is left as it was: mend that, "
                          "then run --fix again") from None
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


def lf(text: str) -> str:
    return text.replace("\r\n", "\n")


def check_blocks(root: Path, fix: bool = False) -> tuple:
    """Compares every copied block with its source; with `fix`, rewrites the copies that differ.

    Returns (problems, fixed): one line per file that cannot be read, and per copy that differs or whose markers are
    wrong (after fixing, only the latter, and the copies that could not be rewritten, with why), and one line per
    block rewritten.
    """
    problems, fixed = [], []
    for block in BLOCKS:
        if not (root / block.source).exists():
            problems.append(f"there is no {block.source}, the source of the {block.name}: restore it, or name the "
                            "block's source in tools/check_copies.py")
            continue
        try:
            source = read(root / block.source, block.source)
        except FileProblem as problem:
            problems.append(str(problem))
            continue
        span = block_span(source, block)
        if isinstance(span, str):
            problems.append(f"{block.source} (the source of the {block.name}) {span}")
            continue
        reference = lf(source[span[0] : span[1]])
        for path, name, text in readable(block.files(root), root, problems):
            span = block_span(text, block)
            if isinstance(span, str):
                problems.append(f"{name} {span}")
                continue
            copy = lf(text[span[0] : span[1]])
            if copy == reference:
                continue
            if fix:
                ending = "\r\n" if "\r\n" in text else "\n"
                try:
                    write(path, name, text[: span[0]] + reference.replace("\n", ending) + text[span[1] :])
                except FileProblem as problem:
                    problems.append(str(problem))
                else:
                    fixed.append(f"{name}: {block.name}")
                    continue
            difference = first_difference(reference, copy)
            problems.append(f"{name}: its {block.name} differs from {block.source}'s ({difference})")
    return problems, fixed


# ---------------------------------------------------------------------------------------------------------------
# Copied objects

OBJECT_COPIES = ("*/diff_pipe*.py",)  # the files whose object markers are checked
OBJECT_MARKER = re.compile(
    r"[ \t]*# Copied from (?P<source>[^\s:]+):(?P<object>[A-Za-z_][\w.]*)(?: with (?P<renames>.*?))?\s*"
)
LOOKS_LIKE_A_MARKER = re.compile(r"\s*# Copied from [^\s:]+\.py:\S.*")  # an object marker, read or not
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def definitions(node, prefix: str = ""):
    """(dotted name, node) of every def and class inside `node`, each before the ones it holds."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, DEFINITIONS):
            yield prefix + child.name, child
            yield from definitions(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.stmt):  # a def under an `if` or a `try` keeps its enclosing name
            yield from definitions(child, prefix)


def indentation(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def object_span(lines: list, node) -> tuple:
    """(first, stop): the lines of `node`, its decorators first, up to the next line at its indentation or lower."""
    first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)]) - 1
    depth = len(indentation(lines[node.lineno - 1]))
    stop = node.end_lineno
    while stop < len(lines) and (not lines[stop].strip() or len(indentation(lines[stop])) > depth):
        stop += 1
    while not lines[stop - 1].strip():
        stop -= 1
    return first, stop


def is_marker(line: str) -> bool:
    return OBJECT_MARKER.fullmatch(line) is not None


def object_text(lines: list, node) -> list:
    """The lines of `node` without line endings, less the markers between its decorators and its def."""
    first, stop = object_span(lines, node)
    text = [line.rstrip("\r") for line in lines[first:stop]]
    return [line for number, line in enumerate(text, first) if number >= node.lineno - 1 or not is_marker(line)]


def parse_renames(text: str):
    """{old: new} from "A->B, C->D"; None where an item does not read old->new."""
    renames = {}
    for item in text.split(","):
        rename = re.fullmatch(r"\s*(\S+?)->(\S+)\s*", item)
        if rename is None or "->" in rename[2]:
            return None
        renames[rename[1]] = rename[2]
    return renames


def renamed(lines: list, renames: dict) -> list:
    """`lines` with every occurrence of each old name replaced, all at once (so A->B, B->A swaps them)."""
    if not renames:
        return lines
    pattern = re.compile("|".join(re.escape(old) for old in sorted(renames, key=len, reverse=True)))
    return [pattern.sub(lambda found: renames[found[0]], line) for line in lines]


def reindented(lines: list, old: str, new: str) -> list:
    if old == new:
        return lines
    return ["" if not line.strip() else new + line[len(old) :] if line.startswith(old) else line for line in lines]


class Sources:
    """The files that copies name, each read and parsed once: (lines, {dotted name: node}) or why not."""

    def __init__(self, root: Path):
        self.root, self.files = root, {}

    def get(self, source: str):
        if source not in self.files:
            path = self.root / source
            if not path.is_file():
                self.files[source] = f"there is no {source}"
            else:
                try:
                    text = read(path, source)
                    tree = ast.parse(text)
                except FileProblem as problem:
                    self.files[source] = str(problem)
                except SyntaxError as error:
                    self.files[source] = f"{source} does not parse ({error.msg}, line {error.lineno})"
                else:
                    named = {}
                    for name, node in definitions(tree):
                        named.setdefault(name, node)
                    self.files[source] = (text.split("\n"), named)
        return self.files[source]


def check_objects_once(root: Path, fix: bool = False) -> tuple:
    """One pass over the object markers of the files in OBJECT_COPIES: (problems, fixed), as `check` returns them.

    A copy whose source is itself a copy fixed in the same pass may need a second pass.
    """
    problems, fixed, sources = [], [], Sources(root)
    paths = sorted({path for pattern in OBJECT_COPIES for path in root.glob(pattern)})
    for path, name, text in readable(paths, root, problems):
        lines = text.split("\n")
        markers = [(number, OBJECT_MARKER.fullmatch(line.rstrip("\r"))) for number, line in enumerate(lines)
                   if LOOKS_LIKE_A_MARKER.fullmatch(line.rstrip("\r"))]
        if not markers:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError as error:
            problems.append(f"{name} does not parse ({error.msg}, line {error.lineno}): its copies were not checked")
            continue
        owners = {}  # a marker's line -> the object it stands over: directly, or among its decorators
        for qualified, node in definitions(tree):
            first = object_span(lines, node)[0]
            for number in [first - 1, *range(first, node.lineno - 1)]:
                owners.setdefault(number, (qualified, node))
        edits = []
        for number, marker in markers:
            if marker is None:
                problems.append(f"{name}:{number + 1}: cannot read the marker {lines[number].strip()!r}: write "
                                "`# Copied from Folder/file.py:Class.method with Old->New`")
                continue
            where, source, wanted = f"{name}:{number + 1}", marker["source"], marker["object"]
            of = f"{source}:{wanted}" + ("" if marker["renames"] is None else f" with {marker['renames']}")
            renames = {} if marker["renames"] is None else parse_renames(marker["renames"])
            if renames is None:
                problems.append(f"{where}: cannot read the renames {marker['renames']!r}: write `with Old->New, A->B`")
                continue
            if number not in owners:
                problems.append(f"{where}: the marker for {of} stands directly above no def or class")
                continue
            qualified, node = owners[number]
            found = sources.get(source)
            if isinstance(found, str):
                problems.append(f"{where}: {qualified} is copied from {of}, but {found}")
                continue
            source_lines, named = found
            if wanted not in named:
                problems.append(f"{where}: {qualified} is copied from {of}, but {source} has no {wanted}")
                continue
            original = named[wanted]
            expected = renamed(object_text(source_lines, original), renames)
            expected = reindented(expected, indentation(source_lines[original.lineno - 1]),
                                  indentation(lines[node.lineno - 1]))
            copy = object_text(lines, node)
            if copy == expected:
                continue
            if not fix:
                difference = first_difference("\n".join(expected), "\n".join(copy), "object")
                problems.append(f"{where}: {qualified} differs from {of} ({difference})")
                continue
            first, stop = object_span(lines, node)
            if first <= number:  # the marker stands among the decorators: it stays after as many lines
                above = sum(not is_marker(line.rstrip("\r")) for line in lines[first:number])
                definition = next(index for index, line in enumerate(expected)
                                  if line.lstrip().startswith(("def ", "async def ", "class ")))
                at = min(above, definition)
                expected = expected[:at] + [lines[number].rstrip("\r")] + expected[at:]
            ending = "\r" if lines[number].endswith("\r") else ""
            edits.append((first, stop, [line + ending for line in expected], f"{name}: {qualified}"))
        applied = []  # a copy inside another copy waits for the next pass
        for edit in sorted(edits):
            if not applied or edit[0] >= applied[-1][1]:
                applied.append(edit)
        for first, stop, replacement, _ in reversed(applied):
            lines[first:stop] = replacement
        if applied:
            try:
                write(path, name, "\n".join(lines))
            except FileProblem as problem:
                problems.append(str(problem))
            else:
                fixed += [copy for *_, copy in applied]
    return problems, fixed


def check_objects(root: Path, fix: bool = False) -> tuple:
    """Compares every copied object with its source; with `fix`, rewrites the copies that differ (a copy of a copy
    once its source has been fixed). Returns (problems, fixed), as `check` does."""
    problems, fixed = [], []
    for _ in range(10 if fix else 0):
        failed, done = check_objects_once(root, fix=True)
        problems += failed  # the files that could not be rewritten are named only here
        if not done:
            break
        fixed += [copy for copy in done if copy not in fixed]
    return list(dict.fromkeys(problems + check_objects_once(root)[0])), fixed


def check(root: Path, fix: bool = False) -> tuple:
    """Compares every copied block and object with its source; with `fix`, rewrites the copies that differ.

    Returns (problems, fixed): one line per file that cannot be read, and per copy that differs or whose marker is
    wrong (after fixing, only the latter, and the copies that could not be rewritten, with why), and one line per copy
    rewritten.
    """
    block_problems, block_fixed = check_blocks(root, fix)
    object_problems, object_fixed = check_objects(root, fix)
    return list(dict.fromkeys(block_problems + object_problems)), block_fixed + object_fixed  # a file read twice


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="store_true", help="rewrite every copy that differs from its source")
    args = parser.parse_args(argv)
    problems, fixed = check(REPO_ROOT, fix=args.fix)
    for copy in fixed:
        print(f"rewrote {copy}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems and not args.fix:
        print("Edit the code in its source file, then run: python -m tools.check_copies --fix", file=sys.stderr)
    if not problems and not fixed:
        print("every copy matches its source")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
