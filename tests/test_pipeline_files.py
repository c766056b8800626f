"""What a reader of any one pipeline file can rely on: the rule comes first, and nothing in the file is dead."""

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILES = sorted(REPO_ROOT.glob("*/diff_pipe*.py"))
RULE_BY_LINE = 120


def module_definitions(tree: ast.Module) -> dict:
    return {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_the_release_rule_is_defined_within_the_first_lines(path):
    rule = module_definitions(ast.parse(path.read_text())).get("release_steps")
    assert rule is not None and rule.lineno <= RULE_BY_LINE, f"release_steps must be defined by line {RULE_BY_LINE}"


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_every_module_level_function_is_used_by_its_own_file(path):
    tree = ast.parse(path.read_text())
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    used |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    # The pipeline classes are what the file exports; every other definition must serve them.
    exported = {name for name, node in module_definitions(tree).items()
                if isinstance(node, ast.ClassDef) and name.endswith("Pipeline")}
    unused = sorted(set(module_definitions(tree)) - used - exported - {"__getattr__"})
    assert unused == [], f"{path.name} defines {unused} but never uses them"
