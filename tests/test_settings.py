"""Settings: parsing, validation, and the sample file listing every setting the code reads."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shared.settings import PLATFORM_SAMPLE, SETTINGS, Settings, SettingsError, sample_settings

ROOT = Path(__file__).resolve().parents[1]


def test_sample_lists_every_setting_and_nothing_else():
    sample = json.loads((ROOT / "local.settings.sample.json").read_text())
    assert sample == sample_settings(), "regenerate: python -m shared.settings --update-docs"
    assert set(sample["Values"]) - set(PLATFORM_SAMPLE) == {s.name for s in SETTINGS}
    assert sample["Values"]["PYTHON_ENABLE_INIT_INDEXING"] == "1"  # needed by the HTTP streaming extension


def test_code_reads_only_declared_settings():
    declared = {s.name for s in SETTINGS}
    pattern = re.compile(r"""(?:environ(?:\.get)?\(|environ\[|getenv\()\s*["']([A-Z][A-Z0-9_]+)["']""")
    for path in list((ROOT / "shared").rglob("*.py")) + [ROOT / "function_app.py"]:
        for name in pattern.findall(path.read_text()):
            if "local" in path.parts:
                continue  # local-only tools, documented in their --help
            assert name in declared, f"{path.relative_to(ROOT)} reads {name}, which SETTINGS does not declare"


AUTH = {"SEKISHO_AUTH_TENANT_IDS": "t1, t2", "SEKISHO_AUTH_AUDIENCES": "api://gw"}


def test_defaults():
    settings = Settings.from_env({"AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com/", **AUTH})
    assert settings.auth_tenant_ids == ("t1", "t2") and settings.auth_audiences == ("api://gw",)
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
        ({"SEKISHO_AUTH_TENANT_IDS": ""}, "SEKISHO_AUTH_TENANT_IDS"),
        ({"SEKISHO_AUTH_AUDIENCES": ""}, "SEKISHO_AUTH_AUDIENCES"),
    ],
)
def test_bad_values_are_refused_clearly(env, message):
    base = {"AZURE_OPENAI_ENDPOINT": "https://x", **AUTH} if "AZURE_OPENAI_ENDPOINT" != message else dict(AUTH)
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({**base, **env})


def test_readme_documents_every_setting():
    from shared.settings import README_END, README_START, markdown_table

    readme = (ROOT / "README.md").read_text()
    table = readme.split(README_START, 1)[1].split(README_END, 1)[0]
    assert table == markdown_table(), "regenerate: python -m shared.settings --update-docs"
