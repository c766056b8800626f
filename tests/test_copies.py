"""Every pipeline file carries the same copied blocks, so that it can be copied by itself (that it stands alone is
tests/test_pipeline_files.py's).

The blocks and their sources are listed in tools/check_copies.py, which checks them, and the objects (defs and
classes) marked as copies, and with --fix rewrites the copies; the --fix tests run on copies of the pipeline files in
a temporary folder.
"""

import errno
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from tools import check_copies

PIPELINE_FILES = sorted(REPO_ROOT.glob("*/diff_pipe*.py"))
BLOCKS = {block.name: block for block in check_copies.BLOCKS}
CORE, IF_HELPERS, RELEASED_MASK = BLOCKS["differential core"], BLOCKS["IF helpers"], BLOCKS["released mask"]
FLOW_RULE = BLOCKS["flow release rule"]
FLOW_FAMILIES = ("SD3", "Flux", "Chroma", "QwenImage", "ZImage")


def block_text(path, block):
    text = path.read_text()
    start, end = check_copies.block_span(text, block)
    return text[start:end]


def test_the_blocks_cover_every_pipeline_file_and_both_if_stages():
    assert REPO_ROOT / "SD2" / "diff_pipe.py" in PIPELINE_FILES
    assert CORE.files(REPO_ROOT) == PIPELINE_FILES
    if_files = [REPO_ROOT / "IF" / "diff_pipe_I.py", REPO_ROOT / "IF" / "diff_pipe_II.py"]
    assert IF_HELPERS.files(REPO_ROOT) == if_files
    flow_files = [path for path in PIPELINE_FILES if "stock_scale_noise = scheduler.scale_noise" in path.read_text()]
    assert FLOW_RULE.files(REPO_ROOT) == flow_files
    assert {path.parent.name for path in flow_files} >= set(FLOW_FAMILIES)
    assert "class FrozenPixels" in block_text(REPO_ROOT / CORE.source, CORE)
    inpaint_files = [REPO_ROOT / "SD2" / "diff_pipe_inpaint.py", REPO_ROOT / "SDXL" / "diff_pipe_inpaint.py"]
    assert RELEASED_MASK.files(REPO_ROOT) == inpaint_files
    assert "class ReleasedMask" in block_text(REPO_ROOT / RELEASED_MASK.source, RELEASED_MASK)


def test_every_copy_is_identical_to_its_source_and_the_command_says_so_from_any_folder(tmp_path):
    problems, fixed = check_copies.check(REPO_ROOT)
    assert problems == [] and fixed == [], "\n".join(problems) + "\nfix with: python -m tools.check_copies --fix"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "check_copies.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "every copy matches its source\n", "")


# ---------------------------------------------------------------------------------------------------------------
# --fix, on a copy of the pipeline files


@pytest.fixture
def tree(tmp_path):
    """The pipeline files in a temporary folder, and a file outside every block's set that carries a drifted core."""
    for path in PIPELINE_FILES:
        copy = tmp_path / path.relative_to(REPO_ROOT)
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, copy)
    (tmp_path / "notes").mkdir()
    begin, end = CORE.markers()
    (tmp_path / "notes" / "old_core.py").write_text(f"{begin}\nsomething else\n{end}\n")
    return tmp_path


def snapshot(root):
    return {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def drift(path, block, old, new):
    """Replaces `old` by `new` inside `block` of `path` (once), and checks it was there."""
    text = path.read_text()
    start, end = check_copies.block_span(text, block)
    assert text[start:end].count(old) == 1, f"{old!r} is not in {path.name}'s {block.name} once"
    path.write_text(text[:start] + text[start:end].replace(old, new) + text[end:])


def test_fix_rewrites_drifted_copies_and_nothing_else(tree):
    sdxl, stage2 = tree / "SDXL" / "diff_pipe.py", tree / "IF" / "diff_pipe_II.py"
    original = snapshot(tree)
    drift(sdxl, CORE, "class FrozenPixels:", "class FrozenPixels:  # drifted")
    drift(stage2, IF_HELPERS, "def per_output(", "def per_output_drifted(")
    sdxl.write_text(sdxl.read_text() + "# outside the block: stays\n")
    sdxl.chmod(0o604)
    drifted, inode = snapshot(tree), sdxl.stat().st_ino

    problems, fixed = check_copies.check(tree)
    assert fixed == [] and snapshot(tree) == drifted
    assert [problem.split(" (")[0] for problem in problems] == [
        "SDXL/diff_pipe.py: its differential core differs from SD2/diff_pipe.py's",
        "IF/diff_pipe_II.py: its IF helpers differs from IF/diff_pipe_I.py's",
    ]
    assert "class FrozenPixels:  # drifted" in problems[0]

    problems, fixed = check_copies.check(tree, fix=True)
    assert problems == [] and fixed == ["SDXL/diff_pipe.py: differential core", "IF/diff_pipe_II.py: IF helpers"]
    expected = {**original, sdxl: original[sdxl] + b"# outside the block: stays\n"}
    assert snapshot(tree) == expected  # the outside file's drifted core included: it is in no block's set
    # written beside it and renamed over it, so that an interrupted fix leaves the old file or the new one
    assert sdxl.stat().st_ino != inode and sdxl.stat().st_mode & 0o777 == 0o604
    assert check_copies.check(tree) == ([], [])


def test_a_crlf_copy_of_a_block_is_compared_and_fixed_in_its_own_line_endings(tree):
    kandinsky = tree / "Kandinsky" / "diff_pipe.py"
    crlf = kandinsky.read_bytes().replace(b"\n", b"\r\n")
    kandinsky.write_bytes(crlf)
    assert check_copies.check(tree) == ([], [])  # the same code in other line endings: a fix would change nothing
    assert crlf.count(b"class FrozenPixels:\r\n") == 1
    kandinsky.write_bytes(crlf.replace(b"class FrozenPixels:\r\n", b"class FrozenPixels:  # drifted\r\n"))
    problems, _ = check_copies.check(tree)
    assert len(problems) == 1 and "'class FrozenPixels:  # drifted' instead of 'class FrozenPixels:'" in problems[0]
    assert check_copies.check(tree, fix=True) == ([], ["Kandinsky/diff_pipe.py: differential core"])
    assert kandinsky.read_bytes() == crlf


@pytest.mark.parametrize("reference, copy, difference", [
    ("a\nb\n", "a\r\nb\r\n", r"line 1 of the block: 'a\r' instead of 'a'"),
    ("a\nb\n", "a\nb\n\n", "line 4 of the block: '' instead of the end of the block"),
    ("a\n" + "x" * 150, "a\n" + "x" * 70 + "y" * 80,
     f"line 2 of the block: ...{'x' * 20 + 'y' * 40!r}... instead of ...{'x' * 60!r}..."),
], ids=["CR", "one line more", "long lines"])
def test_a_difference_names_the_first_differing_line_and_shortens_long_ones(reference, copy, difference):
    assert check_copies.first_difference(reference, copy) == difference


def test_fix_spreads_an_edit_of_the_source(tree):
    drift(tree / CORE.source, CORE, "class FrozenPixels:", "class FrozenPixels:  # edited in the source")
    problems, fixed = check_copies.check(tree, fix=True)
    assert problems == [] and len(fixed) == len(PIPELINE_FILES) - 1
    for path in PIPELINE_FILES:
        assert "class FrozenPixels:  # edited in the source" in block_text(tree / path.relative_to(REPO_ROOT), CORE)


@pytest.mark.parametrize("damage", ["end marker missing", "begin marker twice", "markers swapped"])
def test_fix_leaves_a_file_with_broken_markers_alone_and_says_so(tree, damage):
    kandinsky = tree / "Kandinsky" / "diff_pipe.py"
    drift(kandinsky, CORE, "class FrozenPixels:", "class FrozenPixels:  # drifted")
    begin, end = CORE.markers()
    text = kandinsky.read_text()
    if damage == "end marker missing":
        text = text.replace(end, "# the end")
    elif damage == "begin marker twice":
        text = text + begin + "\n"
    else:
        text = text.replace(begin, "@@").replace(end, begin).replace("@@", end)
    kandinsky.write_text(text)
    before = snapshot(tree)

    problems, fixed = check_copies.check(tree, fix=True)
    assert fixed == [] and snapshot(tree) == before
    assert len(problems) == 1 and problems[0].startswith("Kandinsky/diff_pipe.py ")
    assert begin in problems[0] and end in problems[0]


def test_main_exits_1_naming_the_drift_and_0_once_fixed(tree, monkeypatch, capsys):
    monkeypatch.setattr(check_copies, "REPO_ROOT", tree)
    drift(tree / "SD2" / "diff_pipe.py", CORE, "class FrozenPixels:", "class FrozenPixels:  # edited in the source")
    drift(tree / "IF" / "diff_pipe_I.py", CORE, "class FrozenPixels:", "class FrozenPixels:  # edited in the source")

    assert check_copies.main([]) == 1
    err = capsys.readouterr().err.splitlines()
    drifted = [path.relative_to(REPO_ROOT).as_posix() for path in PIPELINE_FILES]
    drifted = [path for path in drifted if path not in ("SD2/diff_pipe.py", "IF/diff_pipe_I.py")]
    assert [line.split(" (")[0] for line in err[:-1]] == [
        f"error: {path}: its differential core differs from SD2/diff_pipe.py's" for path in drifted
    ]
    assert err[-1] == "Edit the code in its source file, then run: python -m tools.check_copies --fix"

    assert check_copies.main(["--fix"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"rewrote {path}: differential core" for path in drifted]
    assert check_copies.main([]) == 0


# ---------------------------------------------------------------------------------------------------------------
# Copied objects: `# Copied from Folder/file.py:Class.method with Old->New` above a def or class


def object_markers(path):
    """{line number: marker text} of the object markers in `path`."""
    lines = path.read_text().splitlines()
    return {number: line.strip() for number, line in enumerate(lines, 1) if check_copies.OBJECT_MARKER.fullmatch(line)}


def test_the_flow_files_copy_the_stock_hooks_they_share_as_marked_objects():
    copies = {family: sorted(object_markers(REPO_ROOT / family / "diff_pipe.py").values()) for family in FLOW_FAMILIES}
    sd3 = "# Copied from SD3/diff_pipe.py:StableDiffusion3DiffImg2ImgPipeline"
    flux = "# Copied from Flux/diff_pipe.py:FluxDiffImg2ImgPipeline"
    moved = "# Copied from SD2/diff_pipe.py:check_moved_arguments"
    crop = [f"{flux}.crop_unit", f"{sd3}.native_size", f"{sd3}.working_grid"]  # what tools/crop.py reads
    assert copies == {
        "SD3": [moved],
        "Flux": sorted([moved, f"{sd3}.native_size", f"{sd3}.working_grid", f"{sd3}.prepare_latents"]),
        "Chroma": sorted([moved, *crop, f"{sd3}.prepare_latents", f"{flux}._unchanged"]),
        "QwenImage": sorted([moved, *crop, f"{sd3}.prepare_latents"]),
        "ZImage": sorted([moved, f"{flux}.crop_unit", f"{sd3}.native_size", f"{sd3}.prepare_latents"]),
    }


def replace_once(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not in {path.name} once"
    path.write_text(text.replace(old, new))


def marker_line(path, source_object):
    (number,) = [number for number, marker in object_markers(path).items() if marker.endswith(source_object)]
    return number


def test_a_drifted_object_copy_is_reported_and_fix_mends_only_it(tree):
    chroma = tree / "Chroma" / "diff_pipe.py"
    original = snapshot(tree)
    kept = "        # No pixel is released, so no step runs: the result is x0, as at every kept pixel of a run."
    replace_once(chroma, kept, kept.replace("# No pixel", "# drifted: no pixel"))
    chroma.write_text(chroma.read_text() + "# outside the object: stays\n")
    drifted = snapshot(tree)

    problems, fixed = check_copies.check_objects(tree)
    assert fixed == [] and snapshot(tree) == drifted
    line = marker_line(chroma, "Flux/diff_pipe.py:FluxDiffImg2ImgPipeline._unchanged")
    assert problems == [
        f"Chroma/diff_pipe.py:{line}: ChromaDiffImg2ImgPipeline._unchanged differs from "
        f"Flux/diff_pipe.py:FluxDiffImg2ImgPipeline._unchanged (line 2 of the object: "
        f"{kept.replace('# No pixel', '# drifted: no pixel')[:60]!r}... instead of {kept[:60]!r}...)"
    ]

    problems, fixed = check_copies.check_objects(tree, fix=True)
    assert problems == [] and fixed == ["Chroma/diff_pipe.py: ChromaDiffImg2ImgPipeline._unchanged"]
    assert snapshot(tree) == {**original, chroma: original[chroma] + b"# outside the object: stays\n"}
    assert check_copies.check_objects(tree) == ([], [])


def test_fix_spreads_an_edit_of_a_source_object_to_its_copies(tree):
    comment = "        # Stock draws `noise` here"
    replace_once(tree / "SD3" / "diff_pipe.py", comment, comment + " (edited in the source)")
    problems, fixed = check_copies.check_objects(tree, fix=True)
    marker = "# Copied from SD3/diff_pipe.py:StableDiffusion3DiffImg2ImgPipeline.prepare_latents\n"
    copies = sorted(path.relative_to(tree).as_posix() for path in tree.glob("*/diff_pipe*.py")
                    if marker in path.read_text())
    assert {f"{family}/diff_pipe.py" for family in FLOW_FAMILIES[1:]} <= set(copies)
    assert problems == [] and [line.split(":")[0] for line in fixed] == copies
    assert all(line.endswith(".prepare_latents") for line in fixed)
    for path in ["SD3/diff_pipe.py", *copies]:
        assert (tree / path).read_text().count(comment + " (edited in the source)") == 1


SOURCE = '''
class FluxThing:
    def helper(self, flux_value):
        """Makes a FluxOutput."""
        return FluxOutput(flux_value, "FluxThing")  # flux stays lower-case

    @staticmethod
    @torch.no_grad()
    def decorated(x):
        return x + 1
        # a comment at the end of the body belongs to it


def flux_alone():
    return 1
'''

COPY = '''
class ChromaThing:
    # Copied from Flux/diff_pipe.py:FluxThing.helper with Flux->Chroma, flux->chroma
    def helper(self, chroma_value):
        """Makes a ChromaOutput."""
        return ChromaOutput(chroma_value, "ChromaThing")  # chroma stays lower-case

    # Copied from Flux/diff_pipe.py:FluxThing.decorated
    @staticmethod
    @torch.no_grad()
    def decorated(x):
        return x + 1
        # a comment at the end of the body belongs to it

    @staticmethod
    # Copied from Flux/diff_pipe.py:FluxThing.decorated with decorated->decorated_again
    @torch.no_grad()
    def decorated_again(x):
        return x + 1
        # a comment at the end of the body belongs to it


# Copied from Flux/diff_pipe.py:flux_alone with flux->chroma, 1->2
def chroma_alone():
    return 2
'''


@pytest.fixture
def small_tree(tmp_path, monkeypatch):
    """Two pipeline files of made-up code, the second copying objects of the first; no blocks."""
    for folder, text in (("Flux", SOURCE), ("Chroma", COPY)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "diff_pipe.py").write_text(text)
    monkeypatch.setattr(check_copies, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(check_copies, "BLOCKS", [])
    return tmp_path


def test_renames_apply_to_the_source_text_all_at_once(small_tree):
    copy = small_tree / "Chroma" / "diff_pipe.py"
    assert check_copies.check(small_tree) == ([], [])  # decorators count, above the marker or below it

    replace_once(copy, "flux->chroma, 1->2", "flux->chroma")
    replace_once(copy, "Flux->Chroma, flux->chroma", "Flux->Chroma")
    problems, _ = check_copies.check(small_tree)
    assert [problem.split(" (")[0] for problem in problems] == [
        "Chroma/diff_pipe.py:3: ChromaThing.helper differs from Flux/diff_pipe.py:FluxThing.helper with Flux->Chroma",
        "Chroma/diff_pipe.py:23: chroma_alone differs from Flux/diff_pipe.py:flux_alone with flux->chroma",
    ]
    assert "'    def helper(self, chroma_value):' instead of '    def helper(self, flux_value):'" in problems[0]

    problems, fixed = check_copies.check(small_tree, fix=True)
    assert problems == [] and fixed == ["Chroma/diff_pipe.py: ChromaThing.helper", "Chroma/diff_pipe.py: chroma_alone"]
    text = copy.read_text()
    assert 'return ChromaOutput(flux_value, "ChromaThing")  # flux stays lower-case' in text
    assert "def chroma_alone():\n    return 1\n" in text  # the source's text, renamed: the def's name too


def test_fix_keeps_a_marker_between_the_decorators_and_the_def_where_it_is(small_tree):
    copy, source = small_tree / "Chroma" / "diff_pipe.py", small_tree / "Flux" / "diff_pipe.py"
    replace_once(source, "return x + 1", "return x + 2")
    problems, fixed = check_copies.check(small_tree, fix=True)
    assert problems == [] and fixed == ["Chroma/diff_pipe.py: ChromaThing.decorated",
                                        "Chroma/diff_pipe.py: ChromaThing.decorated_again"]
    assert copy.read_text() == COPY.replace("return x + 1", "return x + 2")


def test_a_missing_source_or_object_and_an_unreadable_marker_are_one_line_each_and_fix_leaves_them(small_tree):
    copy = small_tree / "Chroma" / "diff_pipe.py"
    replace_once(copy, "Flux/diff_pipe.py:FluxThing.helper", "Flux/diff_pipe.py:FluxThing.gone")
    replace_once(copy, "# Copied from Flux/diff_pipe.py:FluxThing.decorated\n    @staticmethod",
                 "# Copied from Lost/diff_pipe.py:FluxThing.decorated\n    @staticmethod")
    replace_once(copy, "with flux->chroma, 1->2", "with flux=>chroma")
    copy.write_text(copy.read_text() + "\n# Copied from Flux/diff_pipe.py:flux_alone\nVALUE = 1\n"
                    "# Copied from Flux/diff_pipe.py:flux_alone, and more\n")
    before = copy.read_bytes()

    problems, fixed = check_copies.check(small_tree, fix=True)
    assert fixed == [] and copy.read_bytes() == before
    assert problems == [
        "Chroma/diff_pipe.py:3: ChromaThing.helper is copied from Flux/diff_pipe.py:FluxThing.gone with Flux->Chroma, "
        "flux->chroma, but Flux/diff_pipe.py has no FluxThing.gone",
        "Chroma/diff_pipe.py:8: ChromaThing.decorated is copied from Lost/diff_pipe.py:FluxThing.decorated, but there "
        "is no Lost/diff_pipe.py",
        "Chroma/diff_pipe.py:23: cannot read the renames 'flux=>chroma': write `with Old->New, A->B`",
        "Chroma/diff_pipe.py:27: the marker for Flux/diff_pipe.py:flux_alone stands directly above no def or class",
        "Chroma/diff_pipe.py:29: cannot read the marker '# Copied from Flux/diff_pipe.py:flux_alone, and more': "
        "write `# Copied from Folder/file.py:Class.method with Old->New`",
    ]
    assert all("\n" not in problem for problem in problems)


def test_main_reports_a_drifted_object_and_exits_0_once_fixed(small_tree, capsys):
    replace_once(small_tree / "Chroma" / "diff_pipe.py", "    return 2\n", "    return 3\n")
    assert check_copies.main([]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in err] == [
        "error: Chroma/diff_pipe.py:23: chroma_alone differs from Flux/diff_pipe.py:flux_alone with flux->chroma, 1->2",
        "Edit the code in its source file, then run: python -m tools.check_copies --fix",
    ]
    assert check_copies.main(["--fix"]) == 0
    assert capsys.readouterr().out == "rewrote Chroma/diff_pipe.py: chroma_alone\n"
    assert check_copies.main([]) == 0 and capsys.readouterr().out == "every copy matches its source\n"


def test_a_copy_at_another_indentation_and_with_crlf_endings_is_compared_and_fixed_in_its_own_layout(small_tree):
    copy = small_tree / "Chroma" / "diff_pipe.py"
    copy.write_bytes(b"x = 1\r\n# Copied from Flux/diff_pipe.py:FluxThing.decorated\r\n@staticmethod\r\n"
                     b"@torch.no_grad()\r\ndef decorated(x):\r\n    return x + 2\r\n\r\ny = 2\r\n")
    problems, _ = check_copies.check(small_tree)
    assert problems == ["Chroma/diff_pipe.py:2: decorated differs from Flux/diff_pipe.py:FluxThing.decorated (line 4 "
                        "of the object: '    return x + 2' instead of '    return x + 1')"]
    assert check_copies.check(small_tree, fix=True) == ([], ["Chroma/diff_pipe.py: decorated"])
    assert copy.read_bytes() == (b"x = 1\r\n# Copied from Flux/diff_pipe.py:FluxThing.decorated\r\n@staticmethod\r\n"
                                 b"@torch.no_grad()\r\ndef decorated(x):\r\n    return x + 1\r\n"
                                 b"    # a comment at the end of the body belongs to it\r\n\r\ny = 2\r\n")


def no_space(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("damage, error", [
    ("not UTF-8", "Chroma/diff_pipe.py:2: byte 0xe9 is not UTF-8: save the file as UTF-8"),
    ("mixed endings", "Chroma/diff_pipe.py mixes CRLF and LF line endings: give it one (e.g. dos2unix "
                      "Chroma/diff_pipe.py or unix2dos), then run the check again"),
    ("no block source", "there is no Lost/diff_pipe.py, the source of the lost block: restore it, or name the "
                        "block's source in tools/check_copies.py"),
    ("read-only", "Chroma/diff_pipe.py is read-only: make it writable (e.g. chmod u+w Chroma/diff_pipe.py), then "
                  "run --fix again"),
    ("disk full", f"cannot write Chroma/diff_pipe.py ({os.strerror(errno.ENOSPC)}), so it is left as it was: mend "
                  "that, then run --fix again"),
])
def test_a_file_that_cannot_be_read_or_rewritten_is_one_line_and_fix_leaves_it(small_tree, monkeypatch, capsys,
                                                                                  damage, error):
    copy = small_tree / "Chroma" / "diff_pipe.py"
    text = copy.read_bytes()
    if damage == "not UTF-8":
        copy.write_bytes(text.replace(b"class ChromaThing:", b"class ChromaThing:  # caf\xe9"))
    elif damage == "mixed endings":
        copy.write_bytes(text.replace(b"\n", b"\r\n", 1))
    elif damage == "no block source":
        monkeypatch.setattr(check_copies, "BLOCKS", [check_copies.CopiedBlock("Lost/diff_pipe.py", "lost block", ())])
    else:  # a drifted copy, that --fix cannot rewrite
        copy.write_bytes(text.replace(b"return 2", b"return 3"))
        if damage == "read-only":
            copy.chmod(0o444)
        else:
            monkeypatch.setattr(os, "replace", no_space)
    before = snapshot(small_tree)
    assert check_copies.main(["--fix"]) == 1
    assert capsys.readouterr().err.splitlines()[0] == f"error: {error}"
    assert snapshot(small_tree) == before
