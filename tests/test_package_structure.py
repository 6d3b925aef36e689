"""The package's shape: no module imports another module's `_private` names, and the import graph has no cycle
(function-local imports included: a local import that hides a cycle is still a cycle)."""

import ast
import configparser
import re
import sys
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "spri_hf"


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """`(edges, private_imports)`: module -> the spri_hf modules it imports; `a imports b._name` violations."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    edges, private = {name: set() for name in modules}, []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("spri_hf"):
                        edges[name].add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, node, is_package)
                if not target.startswith("spri_hf"):
                    continue
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if submodule in modules:  # `from . import modeling_spri`
                        edges[name].add(submodule)
                        continue
                    edges[name].add(target)
                    if alias.name.startswith("_") and target != name:
                        private.append(f"{name} imports {target}.{alias.name}")
    # the package's own __init__ re-exports everything: an edge into it from a submodule is what makes cycles
    return {k: {v for v in vs if v != k and v in modules} for k, vs in edges.items()}, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "active"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "active":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_no_module_imports_a_private_name_of_another():
    _, private = import_graph()
    assert not private, "\n".join(private)


def test_the_import_graph_has_no_cycle():
    edges, _ = import_graph()
    cycles = _cycles(edges)
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_checker_sees_local_imports_and_cycles():
    """The checker itself: a cycle through a function-local import is found."""
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("def f():\n    from .modeling_spri import _private\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _resolve("spri_hf.cli", node, False) == "spri_hf.modeling_spri"


# installed with transformers' Trainer but imported by spri_hf only through it
USED_WITHOUT_IMPORT = {"accelerate"}
# modules that only an extra makes importable (`import spri_hf` does not import them): module -> extra
EXTRA_MODULES = {"trl.py": "trl", "training_cli.py": "trl"}  # spri-hf train runs SpriSFTTrainer


def third_party_imports(paths=None) -> set[str]:
    """Top-level names of the non-stdlib, non-spri_hf packages that spri_hf's modules import (local imports too);
    by default every module but the EXTRA_MODULES."""
    found = set()
    paths = paths if paths is not None else [p for p in PACKAGE.rglob("*.py") if p.name not in EXTRA_MODULES]
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name != "spri_hf"}


def install_requires() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(PACKAGE.parent / "setup.cfg")
    lines = [line.strip() for line in parser["options"]["install_requires"].splitlines()]
    return {re.split(r"[<>=!~\[ ;]", line)[0].replace("-", "_") for line in lines if line and not line.startswith("#")}


def test_install_requires_lists_exactly_what_the_package_imports():
    assert install_requires() == third_party_imports() | USED_WITHOUT_IMPORT


@pytest.mark.parametrize("module", sorted(EXTRA_MODULES))
def test_extra_modules_import_only_their_extra_and_are_not_imported_by_the_package(module):
    parser = configparser.ConfigParser()
    parser.read(PACKAGE.parent / "setup.cfg")
    extra = EXTRA_MODULES[module]
    lines = [line.strip() for line in parser["options.extras_require"][extra].splitlines()]
    requirements = {re.split(r"[<>=!~\[ ;]", line)[0].replace("-", "_") for line in lines if line and not line.startswith("#")}
    assert third_party_imports([PACKAGE / module]) <= install_requires() | requirements
    name = module.removesuffix(".py")
    for path in PACKAGE.rglob("*.py"):  # a command may import it when it runs; no module imports it when imported
        top_level = ast.parse(path.read_text(encoding="utf-8")).body
        imported = {node.module for node in top_level if isinstance(node, ast.ImportFrom) and node.level == 1}
        assert name not in imported, path


MAX_MODULE_LINES = 600


def test_no_module_is_longer_than_600_lines():
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}  # fmt: skip
    assert not long, f"split these modules (at most {MAX_MODULE_LINES} lines each): {long}"


def shipped_files() -> set[str]:
    """The files `save_pretrained` copies into every checkpoint: the modeling and configuration files and, as
    transformers collects them, their relative imports (recursively)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    shipped = set()
    for entry in ("modeling_spri.py", "configuration_spri.py"):
        shipped |= {Path(path).name for path in get_relative_import_files(str(PACKAGE / entry))} | {entry}
    return shipped


def _guarded(tree: ast.AST, node: ast.AST) -> bool:
    """Whether `node` sits in a `try` whose handler catches ImportError (the modeling file's `from_dense` import)."""
    for parent in ast.walk(tree):
        if isinstance(parent, ast.Try) and any(node in ast.walk(statement) for statement in parent.body):
            caught = [ast.unparse(handler.type) for handler in parent.handlers if handler.type is not None]
            if any("ImportError" in name for name in caught):
                return True
    return False


def test_shipped_files_import_only_shipped_files_and_transformers_dependencies():
    shipped = shipped_files()
    assert {"modeling_spri.py", "configuration_spri.py", "moe_layers.py", "backbone.py", "persistence.py"} <= shipped
    allowed_third_party = {"torch", "transformers", "safetensors", "huggingface_hub"}
    problems = []
    for name in sorted(shipped):
        tree = ast.parse((PACKAGE / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                targets = [node.module] if node.module else [alias.name for alias in node.names]
                for target in targets:
                    if f"{target.split('.')[0]}.py" not in shipped and not _guarded(tree, node):
                        problems.append(f"{name} imports .{target}, which is not shipped")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                for module in modules:
                    top = module.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in allowed_third_party:
                        problems.append(f"{name} imports {module}")
    assert not problems, "\n".join(problems)


def test_the_shipped_file_check_sees_an_unguarded_import():
    tree = ast.parse("try:\n    from . import upcycling\nexcept ImportError:\n    pass\nfrom . import cli\n")
    imports = {node.names[0].name: node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    guarded, plain = imports["upcycling"], imports["cli"]
    assert _guarded(tree, guarded) and not _guarded(tree, plain)
