"""Rules of the test suite itself: test modules share helpers through ``helpers.py`` / ``conftest.py`` and never
import one another (a test module imported elsewhere runs its module-level code twice and couples unrelated tests).

(That Ray runs only in tests marked ``slow`` is enforced at run time by ``conftest.py``.)
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth (function-local imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_module_imports_another():
    test_modules = {path.stem for path in TESTS.glob("test_*.py")}
    offenders = {path.name: sorted(imported_modules(path) & test_modules) for path in sorted(TESTS.glob("test_*.py"))}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_checker_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text("import os\n\ndef test_x():\n    from test_embed import make_model\n    import test_train.sub\n")
    assert imported_modules(probe) == {"os", "test_embed", "test_train"}
