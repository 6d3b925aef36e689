"""The test suite's shape, in both of its folders: tests/ (the library) and benchmarks/tests/ (the benchmarks).

No file in either imports a test module, so each test module can be run, moved or deleted on its own. What several
modules share lives in tests/conftest.py (helpers, constants, fixtures) and in benchmarks/tests/support.py. The
benchmarks' folder has no conftest.py: conftest.py files outside packages are all imported as the one module
`conftest`, so with a second one `from conftest import ...` in tests/ would find it whenever both folders are
collected. For the same reason (pytest imports test modules by file name), no two test modules share a name.
"""

import ast
from pathlib import Path


TESTS = Path(__file__).resolve().parent
BENCHMARK_TESTS = TESTS.parent / "benchmarks" / "tests"
FOLDERS = (TESTS, BENCHMARK_TESTS)


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


def imports_conftest(source: str) -> bool:
    """Whether `source` imports the module `conftest` (`import conftest`, `from conftest import ...`)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(alias.name == "conftest" for alias in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "conftest":
            return True
    return False


def test_no_file_in_either_test_folder_imports_a_test_module():
    files = sorted(path for folder in FOLDERS for path in folder.glob("*.py"))
    for folder in FOLDERS:
        assert any(path.parent == folder and path.name.startswith("test_") for path in files), folder
    assert (TESTS / "conftest.py") in files and (BENCHMARK_TESTS / "support.py") in files
    violations = [
        f"{path.relative_to(TESTS.parent)} imports {module}"
        for path in files
        for module in imported_test_modules(path.read_text(encoding="utf-8"))
    ]
    assert not violations, "shared helpers belong in conftest.py or support.py:\n" + "\n".join(violations)


def test_the_benchmarks_tests_have_no_conftest_and_never_import_one():
    assert not (BENCHMARK_TESTS / "conftest.py").exists(), "shared helpers of benchmarks/tests belong in support.py"
    importing = [path.name for path in sorted(BENCHMARK_TESTS.glob("*.py"))
                 if imports_conftest(path.read_text(encoding="utf-8"))]
    assert not importing, f"these import tests/conftest.py's module by name; use benchmarks.tests.support: {importing}"


def test_no_two_test_modules_share_a_file_name():
    names = [path.name for folder in FOLDERS for path in folder.glob("test_*.py")]
    assert len(names) == len(set(names)), sorted({name for name in names if names.count(name) > 1})


def test_the_conftest_checker():
    assert imports_conftest("from conftest import tiny_dense") and imports_conftest("import os, conftest")
    assert imports_conftest("def f():\n    from conftest import words\n")
    assert not imports_conftest("from benchmarks.tests.support import require_packages\nimport my_conftest\n")


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
