"""Package hygiene: light imports, the console script, thin job wrappers."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "faiss", "pandas", "timm", "pyarrow", "sklearn")


def test_importing_the_library_and_cli_pulls_in_nothing_heavy():
    code = ("import sys, whale_dist, whale_dist.cli, whale_dist.config, whale_dist.storage, whale_dist.catalog, "
            f"whale_dist.metrics; print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def test_console_script_lists_every_subcommand():
    from whale_dist.cli import COMMANDS

    out = subprocess.run([sys.executable, "-m", "whale_dist.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in COMMANDS:
        assert f"  {name} " in out


def test_unknown_command_and_bad_override_are_one_line_errors():
    bad = subprocess.run([sys.executable, "-m", "whale_dist.cli", "bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'bogus'" in bad.stderr
    wrong = subprocess.run([sys.executable, "-m", "whale_dist.cli", "synth", "synth.seed=abc"], capture_output=True,
                           text=True)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().count("\n") == 0 and "synth.seed" in wrong.stderr and "Traceback" not in wrong.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.py")), ids=lambda p: p.name)
def test_jobs_are_thin_main_wrappers(path):
    tree = ast.parse(path.read_text())
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert [f.name for f in functions] == ["main"], "a job defines main(argv) and nothing else"
    assert len(path.read_text().splitlines()) <= 30
