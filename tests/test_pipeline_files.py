"""What a reader of any one pipeline file can rely on: it stands alone, the rule comes first, and nothing in it is
dead."""

import ast
import sys

import pytest
from conftest import REPO_ROOT

PIPELINE_FILES = sorted(REPO_ROOT.glob("*/diff_pipe*.py"))
ALLOWED_IMPORTS = {"torch", "diffusers", "transformers", "PIL", "numpy"}
RULE_BY_LINE = 120


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_pipeline_file_imports_only_the_stack_defines_the_rule_first_and_uses_every_function(path):
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name} has a relative import"
            imported.add(node.module.split(".")[0])
    outside = imported - ALLOWED_IMPORTS - set(sys.stdlib_module_names)
    assert not outside, f"{path.name} imports {sorted(outside)}: a pipeline file must stand alone"

    definitions = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    rule = definitions.get("release_steps")
    assert rule is not None and rule.lineno <= RULE_BY_LINE, f"release_steps must be defined by line {RULE_BY_LINE}"

    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    used |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    # The pipeline classes are what the file exports; every other definition must serve them.
    exported = {name for name, node in definitions.items()
                if isinstance(node, ast.ClassDef) and name.endswith("Pipeline")}
    unused = sorted(set(definitions) - used - exported - {"__getattr__"})
    assert unused == [], f"{path.name} defines {unused} but never uses them"
