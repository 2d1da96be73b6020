"""Settings: parsing, validation, and the sample file listing every setting the code reads."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shared.settings import SETTINGS, Settings, SettingsError

ROOT = Path(__file__).resolve().parents[1]
# Read by the Functions host and worker themselves, not by Sekisho's code.
PLATFORM_SETTINGS = {"FUNCTIONS_WORKER_RUNTIME", "AzureWebJobsStorage", "PYTHON_ENABLE_INIT_INDEXING"}


def test_sample_lists_every_setting_and_nothing_else():
    sample = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    assert set(sample) - PLATFORM_SETTINGS == {s.name for s in SETTINGS}
    assert sample["PYTHON_ENABLE_INIT_INDEXING"] == "1"  # needed by the HTTP streaming extension


def test_code_reads_only_declared_settings():
    declared = {s.name for s in SETTINGS}
    pattern = re.compile(r"""(?:environ(?:\.get)?\(|environ\[|getenv\()\s*["']([A-Z][A-Z0-9_]+)["']""")
    for path in list((ROOT / "shared").rglob("*.py")) + [ROOT / "function_app.py"]:
        for name in pattern.findall(path.read_text()):
            if "localhost" in path.parts or "simulator" in path.parts:
                continue  # local-only tools, documented in their --help
            assert name in declared, f"{path.relative_to(ROOT)} reads {name}, which SETTINGS does not declare"


def test_defaults():
    settings = Settings.from_env({"AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com/"})
    assert settings.azure_openai_endpoint == "https://x.openai.azure.com"
    assert settings.store == "sqlite" and settings.log_content == "full"
    assert settings.upstream_read_timeout == 220


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "AZURE_OPENAI_ENDPOINT"),
        ({"SEKISHO_MAX_BODY_BYTES": "lots"}, "not a number"),
        ({"SEKISHO_MAX_BODY_BYTES": "10"}, "at least"),
        ({"SEKISHO_STORE": "postgres"}, "sqlite, cosmos"),
        ({"SEKISHO_STORE": "cosmos"}, "SEKISHO_COSMOS_ENDPOINT"),
        ({"SEKISHO_COSMOS_VERIFY_TLS": "maybe"}, "true or false"),
        ({"SEKISHO_LOG_CONTENT": "everything"}, "full, redacted, metadata"),
    ],
)
def test_bad_values_are_refused_clearly(env, message):
    base = {"AZURE_OPENAI_ENDPOINT": "https://x"} if "AZURE_OPENAI_ENDPOINT" != message else {}
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({**base, **env})
