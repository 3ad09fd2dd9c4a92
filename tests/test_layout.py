"""The package's shape: folders import only folders below them, no import circles, every internal
import at module top, the CLI stays thin, and the packaging lists every package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "smcp_core"

# the data flow, bottom to top: a module may import its own folder and folders of a lower rank
RANKS = {
    "": 0, "errors": 0, "events": 0,
    "utils": 1,
    "config": 2,
    "models": 3, "data": 3,
    "graph": 4,
    "profile": 5,
    "prune": 6,
    "slim": 7,
    "export": 8,
    "stages": 9,
    "analysis": 10,
    "api": 11,
    "integrations": 12,
}
CLI_MAY_IMPORT = {"", "errors", "events", "utils", "config", "stages", "analysis"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _folder(module: str) -> str:
    """``smcp_core.prune.trainer`` -> ``prune``; ``smcp_core.errors`` -> ``errors``; the package -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported smcp module, line, at module top) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [base] if node.module else []
            names += [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("smcp_core", "smcp_cli"):
                out.append((name, node.lineno, id(node) in top))
    return out


def _existing_module(name: str, modules: set[str]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _all_modules(root: Path) -> dict[str, Path]:
    return {_module_name(p): p for p in root.rglob("*.py")}


def test_every_folder_imports_only_folders_below_it():
    modules = _all_modules(CORE)
    bad = []
    for mod, path in modules.items():
        own = _folder(mod)
        assert own in RANKS, f"{path}: folder {own!r} has no rank in tests/test_layout.py RANKS"
        for name, line, _ in _imports(path):
            assert not name.startswith("smcp_cli"), f"{path}:{line}: the library imports the CLI"
            target = _existing_module(name, set(modules))
            if target is None or target == mod:
                continue
            other = _folder(target)
            if other != own and RANKS[other] >= RANKS[own] and other != "":
                bad.append(f"{path.relative_to(REPO)}:{line}: {own or 'smcp_core'} imports {target} "
                           f"({other} is not below {own})")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    modules = _all_modules(CORE)
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        for name, _, _ in _imports(path):
            target = _existing_module(name, set(modules))
            # a package's __init__ re-exporting its children is not a circle
            if target and target != mod and not target.startswith(mod + ".") and not mod.startswith(target + "."):
                graph[mod].add(target)
    circles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_library_imports_its_own_modules_at_module_top():
    late = [f"{path.relative_to(REPO)}:{line}: {name}" for path in CORE.rglob("*.py")
            for name, line, top in _imports(path) if not top and not _in_type_checking(path, line)]
    assert not late, "imports inside functions (move them to the top):\n" + "\n".join(late)


def _in_type_checking(path: Path, line: int) -> bool:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            if node.lineno <= line <= node.end_lineno:
                return True
    return False


def test_library_has_no_cli_dependencies():
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for n in names:
                    assert n.split(".")[0] not in ("typer", "rich", "click"), f"{path}: imports {n}"


def test_cli_uses_only_the_stage_level_api():
    modules = _all_modules(CORE)
    bad = []
    for path in (REPO / "smcp_cli").rglob("*.py"):
        for name, line, _ in _imports(path):
            if not name.startswith("smcp_core"):
                continue
            target = _existing_module(name, set(modules)) or "smcp_core"
            if _folder(target) not in CLI_MAY_IMPORT:
                bad.append(f"{path.relative_to(REPO)}:{line}: {target}")
    assert not bad, "the CLI reaches below stages/analysis/config:\n" + "\n".join(bad)


def test_packaging_lists_every_package_and_ships_the_recipes():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    tree = {_module_name(p.parent / "__init__.py") for root in (CORE, REPO / "smcp_cli")
            for p in root.rglob("__init__.py")}
    assert listed - {"smcp_core.recipes"} == tree
    assert cfg["package-dir"]["smcp_core.recipes"] == "recipes"
    assert {p.stem for p in (REPO / "recipes").glob("*.yaml")} >= {"quickstart", "cifar10_resnet56_2x", "rn50_fps2x"}


@pytest.mark.parametrize("name", ["quickstart", "cifar10_resnet56_2x", "rn50_fps2x"])
def test_builtin_recipes_are_the_top_level_folder(name):
    from smcp_core.config.recipe import BUILTIN_RECIPE_DIR, builtin_recipe_names

    assert name in builtin_recipe_names()
    assert (BUILTIN_RECIPE_DIR / f"{name}.yaml").read_bytes() == (REPO / "recipes" / f"{name}.yaml").read_bytes()


def test_no_library_function_is_long_without_a_reason():
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    try:
        from function_lengths import function_lengths
    finally:
        sys.path.pop(0)
    long = [str(f) for f in function_lengths(CORE) if f.lines > 100 and not f.justified]
    assert not long, "functions over 100 code lines without a '# long:' comment:\n" + "\n".join(long)
