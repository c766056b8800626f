"""Every pipeline file carries the same copied blocks and stands alone, so that it can be copied by itself.

The blocks and their sources are listed in tools/check_copies.py, which checks them and with --fix rewrites the
copies; the --fix tests run on copies of the pipeline files in a temporary folder.
"""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import check_copies

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILES = sorted(REPO_ROOT.glob("*/diff_pipe*.py"))
ALLOWED_IMPORTS = {"torch", "diffusers", "transformers", "PIL", "numpy"}
CORE, IF_HELPERS, FLOW, RELEASED_MASK = check_copies.BLOCKS


def block_text(path, block):
    text = path.read_text()
    start, end = check_copies.block_span(text, block)
    return text[start:end]


def test_the_blocks_cover_every_pipeline_file_and_both_if_stages():
    assert REPO_ROOT / "SD2" / "diff_pipe.py" in PIPELINE_FILES
    assert CORE.files(REPO_ROOT) == PIPELINE_FILES
    if_files = [REPO_ROOT / "IF" / "diff_pipe_I.py", REPO_ROOT / "IF" / "diff_pipe_II.py"]
    assert IF_HELPERS.files(REPO_ROOT) == if_files
    flow_files = [path for path in PIPELINE_FILES if "def flow_release_steps" in path.read_text()]
    assert FLOW.files(REPO_ROOT) == flow_files and len(flow_files) == 5
    assert "class FrozenPixels" in block_text(REPO_ROOT / CORE.source, CORE)
    inpaint_files = [REPO_ROOT / "SD2" / "diff_pipe_inpaint.py", REPO_ROOT / "SDXL" / "diff_pipe_inpaint.py"]
    assert RELEASED_MASK.files(REPO_ROOT) == inpaint_files
    assert "class ReleasedMask" in block_text(REPO_ROOT / RELEASED_MASK.source, RELEASED_MASK)


def test_every_copy_is_identical_to_its_source():
    problems, fixed = check_copies.check(REPO_ROOT)
    assert problems == [] and fixed == [], "\n".join(problems) + "\nfix with: python -m tools.check_copies --fix"


def test_the_command_runs_from_any_folder(tmp_path):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "check_copies.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "every copied block matches its source\n", "")


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_pipeline_file_imports_only_the_stack(path):
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name} has a relative import"
            imported.add(node.module.split(".")[0])
    outside = imported - ALLOWED_IMPORTS - set(sys.stdlib_module_names)
    assert not outside, f"{path.name} imports {sorted(outside)}: a pipeline file must stand alone"


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
    return {path: path.read_bytes() for path in sorted(root.rglob("*.py"))}


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
    drifted = snapshot(tree)

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
    assert check_copies.check(tree) == ([], [])


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
    assert err[-1] == "Edit a block in its source file, then run: python -m tools.check_copies --fix"

    assert check_copies.main(["--fix"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"rewrote {path}: differential core" for path in drifted]
    assert check_copies.main([]) == 0
