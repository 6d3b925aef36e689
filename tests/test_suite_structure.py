"""The test suite's shape: no file under tests/ imports a test module. What several modules share (helpers,
constants, fixtures) lives in conftest.py, so each test module can be run, moved or deleted on its own."""

import ast
from pathlib import Path


TESTS = Path(__file__).resolve().parent


def _is_test_module(name: str) -> bool:
    return name.split(".")[0].startswith("test_")


def imported_test_modules(source: str) -> list[str]:
    """The test modules that `source` imports, at any depth (function-local imports included): `import test_x`,
    `from test_x import ...`, `from . import test_x`, and `importlib.import_module("test_x")` / `__import__`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_test_module(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.module and _is_test_module(node.module):
                found.append(node.module)
            elif not node.module:  # `from . import test_x`
                found += [alias.name for alias in node.names if _is_test_module(alias.name)]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            argument = node.args[0].value
            if name in ("import_module", "__import__") and isinstance(argument, str) and _is_test_module(argument):
                found.append(argument)
    return found


def test_no_file_under_tests_imports_a_test_module():
    files = sorted(TESTS.glob("*.py"))
    assert any(path.name.startswith("test_") for path in files) and (TESTS / "conftest.py") in files
    violations = [
        f"{path.name} imports {module}"
        for path in files
        for module in imported_test_modules(path.read_text(encoding="utf-8"))
    ]
    assert not violations, "shared helpers belong in conftest.py:\n" + "\n".join(violations)


def test_the_checker_sees_every_form_of_import():
    assert imported_test_modules("import test_export") == ["test_export"]
    assert imported_test_modules("import os, test_export as e") == ["test_export"]
    assert imported_test_modules("from test_seq2seq import FAMILIES as F, tiny") == ["test_seq2seq"]
    assert imported_test_modules("def f():\n    if True:\n        from test_seq2seq import _BERT\n") == ["test_seq2seq"]
    assert imported_test_modules("from . import test_training") == ["test_training"]
    assert imported_test_modules("from .test_training import _dataset") == ["test_training"]
    assert imported_test_modules("import importlib\nimportlib.import_module('test_hub')") == ["test_hub"]
    assert imported_test_modules("__import__('test_hub')") == ["test_hub"]
    # what is allowed: conftest, the hub server helper, libraries, and names that merely contain "test_"
    allowed = (
        "from conftest import tiny_dense\nimport conftest\nfrom hub_server import LocalHub\nimport pytest\n"
        "from unittest import mock\nimport my_test_utils\nfrom spri_hf.test_utils import x\n"
        "importlib.import_module('spri_hf')\n"
    )
    assert imported_test_modules(allowed) == []
