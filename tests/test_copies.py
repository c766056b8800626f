"""Every pipeline file carries the same differential core and stands alone, so that it can be copied by itself."""

import ast
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILES = sorted(REPO_ROOT.glob("*/diff_pipe*.py"))
BEGIN = "# Copied from SD2/diff_pipe.py: differential core (begin)"
END = "# Copied from SD2/diff_pipe.py: differential core (end)"
ALLOWED_IMPORTS = {"torch", "diffusers", "transformers", "PIL", "numpy"}


def core_of(path):
    text = path.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{path.name} must mark its core once with {BEGIN!r}"
    return text[text.index(BEGIN) : text.index(END)]


def test_the_reference_core_is_there():
    assert REPO_ROOT / "SD2" / "diff_pipe.py" in PIPELINE_FILES
    assert "class FrozenPixels" in core_of(REPO_ROOT / "SD2" / "diff_pipe.py")


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_core_is_identical_to_the_reference(path):
    reference = core_of(REPO_ROOT / "SD2" / "diff_pipe.py").splitlines()
    copy = core_of(path).splitlines()
    drift = [f"line {n}: {a!r} != {b!r}" for n, (a, b) in enumerate(zip(reference, copy), 1) if a != b]
    assert not drift and len(copy) == len(reference), f"{path.name} drifted from SD2/diff_pipe.py: {drift[:3]}"


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
