"""The package `func azure functionapp publish` uploads, built and installed as Azure would.

Publish zips the project folder minus what `.funcignore` names; the remote build installs
`requirements.txt` into a fresh environment with nothing else; the Python worker then imports
`function_app.py` and indexes its functions. This test does the same three steps here: what only
local use needs (the local host, the simulator, the local token issuer, the tests) must not be in
the package, and the app must import and index from the package alone, without loading any of it.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def funcignore_patterns() -> list[str]:
    lines = (ROOT / ".funcignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def ignored(relative: str, is_dir: bool, patterns: list[str]) -> bool:
    """.funcignore follows .gitignore's rules for these forms: `name/` a folder at any depth,
    `a/b/` anchored at the root, `*.ext` globs on names, plain names anywhere."""
    name = relative.rsplit("/", 1)[-1]
    for pattern in patterns:
        folder_only = pattern.endswith("/")
        body = pattern.rstrip("/")
        if folder_only and not is_dir:
            continue
        if "/" in body.lstrip("/"):
            if fnmatch.fnmatchcase(relative, body.lstrip("/")):
                return True
        elif fnmatch.fnmatchcase(name, body):
            return True
    return False


def package_files() -> list[Path]:
    """The files publish would upload, relative to the project root."""
    patterns = funcignore_patterns()
    found: list[Path] = []
    for folder, dirs, files in os.walk(ROOT):
        here = Path(folder).relative_to(ROOT)
        dirs[:] = [d for d in dirs if not ignored((here / d).as_posix(), True, patterns)]
        found.extend(here / f for f in files if not ignored((here / f).as_posix(), False, patterns))
    return sorted(found)


def test_local_only_code_and_development_files_stay_out_of_the_package():
    files = {path.as_posix() for path in package_files()}
    # What the app needs, and nothing a developer's or a test run's files could add unnoticed.
    assert {path.split("/", 1)[0] for path in files} <= {"function_app.py", "host.json", "requirements.txt", "shared", "README.md", ".funcignore"}
    assert {"function_app.py", "host.json", "requirements.txt", "shared/gateway.py", "shared/operations.py"} <= files
    assert "shared/quota/bpe/o200k_base.tiktoken.gz" in files  # the tokenizer's ranks ship with the code
    assert "shared/admin/ui/index.html" in files  # the admin page
    for path in files:
        assert not path.startswith(("shared/local/", "tests/", "bench/", "infra/", "docs/", ".venv/", ".git/", "node_modules/")), path
        assert "__pycache__" not in path and not path.endswith(".pyc"), path
        assert path != "local.settings.json", "local settings (secrets) would be uploaded"


@pytest.fixture(scope="module")
def installed_package(tmp_path_factory):
    """The package copied out, and a fresh virtual environment with requirements.txt only."""
    base = tmp_path_factory.mktemp("publish")
    package = base / "package"
    for relative in package_files():
        target = package / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    venv = base / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # As the remote build does: requirements.txt and nothing else (no test or development packages).
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", "requirements.txt"],
                          cwd=package, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return package, python


INDEX = """
import json, sys
import function_app
functions = function_app.app.get_functions()
print(json.dumps({
    "functions": {f.get_function_name(): json.loads(f.get_function_json())["bindings"][0]["type"] for f in functions},
    "local_modules": sorted(m for m in sys.modules if m.startswith("shared.local")),
    "test_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("pytest", "hypothesis", "playwright", "schemathesis")),
}))
"""


def test_the_package_imports_and_indexes_from_its_own_requirements(installed_package):
    package, python = installed_package
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEKISHO_", "AZURE_OPENAI_", "PYTHONPATH"))}
    done = subprocess.run([str(python), "-c", INDEX], cwd=package, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    indexed = json.loads(done.stdout.strip().splitlines()[-1])
    import function_app
    from shared.local.host.functions_host import registered_functions

    expected = {f.get_function_name() for f in registered_functions(function_app.app)}
    assert set(indexed["functions"]) == expected  # every function, HTTP, Durable and the timer
    assert indexed["functions"]["reconcile_deferred_work"] == "timerTrigger"
    assert indexed["functions"]["sekisho_job"] == "orchestrationTrigger"
    assert indexed["local_modules"] == [] and indexed["test_modules"] == []
