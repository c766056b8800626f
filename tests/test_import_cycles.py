"""No module of the tools, the benchmarks, app.py or a run.py imports, however indirectly (at the top or inside a
function), a module that imports it back: a static (``ast``) graph of the repository's import statements."""

import ast
import os
from pathlib import Path

from conftest import REPO_ROOT

# Folders whose modules tests/ and some tools reach by their bare name, with the folder on sys.path.
PATH_FOLDERS = ("tests",)


def repo_modules(root: Path = REPO_ROOT) -> dict[str, Path]:
    """Every module of the repository by its dotted name (``tools.cli``, ``app``), and ``PATH_FOLDERS``' bare too."""
    modules, files = {}, []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith((".", "__"))]  # .venv, __pycache__
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    for path in sorted(files):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
        if len(parts) == 2 and parts[0] in PATH_FOLDERS:
            modules.setdefault(parts[1], path)
    return modules


def imported(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The repository modules that the module ``name`` at ``path`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                base = ".".join([*anchor, *([base] if base else [])])
            candidates = [f"{base}.{alias.name}" if base else alias.name for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:  # `import a.b.c` imports a, a.b and a.b.c
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate:
                found.add(modules[candidate].as_posix())
    return found


def import_graph(root: Path = REPO_ROOT) -> dict[str, set[str]]:
    """``{file: files it imports}`` over the repository's files (posix paths)."""
    modules = repo_modules(root)
    graph = {path.as_posix(): set() for path in modules.values()}
    for name, path in modules.items():
        graph[path.as_posix()] |= imported(path, name, modules)
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The nodes that some path of one edge or more leads to from ``start``."""
    seen, todo = set(), [start]
    while todo:
        for successor in graph[todo.pop()] - seen:
            seen.add(successor)
            todo.append(successor)
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` that hold a cycle."""
    reach = {node: reachable(graph, node) for node in graph}
    on_cycles = [node for node in graph if node in reach[node]]
    found = {tuple(sorted(other for other in reach[node] if node in reach[other])) for node in on_cycles}
    return sorted(list(component) for component in found)


def in_the_house(path: str) -> bool:
    """The modules this test guards: tools/, benchmarks/, app.py and every run.py."""
    parts = Path(path).relative_to(REPO_ROOT).parts
    return parts[0] in ("tools", "benchmarks") or parts == ("app.py",) or parts[-1] == "run.py"


def test_the_cycle_finder_finds_cycles_direct_indirect_and_lazy(tmp_path):
    for name, text in {"a.py": "import b\n", "b.py": "def f():\n    from c import x\n", "c.py": "from a import y\n",
                       "d.py": "import a\n", "pkg/__init__.py": "", "pkg/e.py": "from . import f\n",
                       "pkg/f.py": "from pkg.e import z\n", "g.py": "import os, pkg\n"}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    found = [[Path(path).name for path in component] for component in cycles(import_graph(tmp_path))]
    assert sorted(found) == [["a.py", "b.py", "c.py"], ["e.py", "f.py"]]


def test_no_module_of_the_house_takes_part_in_an_import_cycle():
    graph = import_graph()
    assert any(in_the_house(path) for path in graph) and graph[(REPO_ROOT / "tools" / "batch.py").as_posix()]
    offending = [component for component in cycles(graph) if any(in_the_house(path) for path in component)]
    assert offending == [], "import cycles: " + "; ".join(
        " <-> ".join(str(Path(path).relative_to(REPO_ROOT)) for path in component) for component in offending)
