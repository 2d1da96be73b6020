"""Settings read from the environment (Function App settings in Azure, env vars locally).

Every name the gateway reads is declared here, once, in `SETTINGS`. The test suite checks that
`local.settings.sample.json` lists exactly these names, so the sample stays complete.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    description: str


SETTINGS: tuple[Setting, ...] = (
    Setting("AZURE_OPENAI_ENDPOINT", "", "Upstream Azure OpenAI endpoint, e.g. https://myaoai.openai.azure.com. Empty = the built-in simulator (local mode only)."),
    Setting("AZURE_OPENAI_API_KEY", "", "Upstream api-key. Empty = Entra ID token from the managed identity (DefaultAzureCredential)."),
    Setting("AZURE_OPENAI_API_VERSION", "2024-10-21", "api-version sent upstream on Azure-style routes when the client sent none."),
    Setting("AZURE_CLIENT_ID", "", "Client id of the user-assigned managed identity (read by azure-identity)."),
    Setting("SEKISHO_UPSTREAM_CONNECT_TIMEOUT_SECONDS", "10", "Time allowed to open a connection to the upstream."),
    Setting("SEKISHO_UPSTREAM_READ_TIMEOUT_SECONDS", "220", "Longest silence allowed from the upstream (first byte, or between stream chunks); below the 230 s that Azure allows an HTTP response to start."),
    Setting("SEKISHO_UPSTREAM_MAX_CONNECTIONS", "256", "Size of the pooled upstream connection pool."),
    Setting("SEKISHO_MAX_BODY_BYTES", "8388608", "Largest request body accepted (413 above)."),
    Setting("SEKISHO_STORE", "sqlite", "Store adapter: sqlite or cosmos."),
    Setting("SEKISHO_SQLITE_PATH", ".data/sekisho.db", "SQLite database file (sqlite store)."),
    Setting("SEKISHO_COSMOS_ENDPOINT", "", "Cosmos DB account endpoint (cosmos store)."),
    Setting("SEKISHO_COSMOS_KEY", "", "Cosmos DB key. Empty = Entra ID (managed identity), the production choice."),
    Setting("SEKISHO_COSMOS_DATABASE", "sekisho", "Cosmos DB database name."),
    Setting("SEKISHO_COSMOS_VERIFY_TLS", "true", "Verify the Cosmos endpoint's TLS certificate (false only for a local emulator)."),
    Setting("SEKISHO_LOG_CONTENT", "full", "Content kept in request logs: full, redacted or metadata."),
    Setting("SEKISHO_LOG_RETENTION_DAYS", "30", "Request log retention (TTL) in days."),
    Setting("SEKISHO_LOG_FLUSH_INTERVAL_MS", "100", "Longest time a log record waits in memory before it is written."),
    Setting("SEKISHO_LOG_BATCH_SIZE", "200", "Most log records written in one batch."),
)

_BY_NAME = {s.name: s for s in SETTINGS}


class SettingsError(ValueError):
    """A setting has a value the gateway cannot use; raised at start, never per request."""


@dataclass(frozen=True)
class Settings:
    azure_openai_endpoint: str
    azure_openai_api_key: str
    azure_openai_api_version: str
    upstream_connect_timeout: float
    upstream_read_timeout: float
    upstream_max_connections: int
    max_body_bytes: int
    store: str
    sqlite_path: str
    cosmos_endpoint: str
    cosmos_key: str
    cosmos_database: str
    cosmos_verify_tls: bool
    log_content: str
    log_retention_days: int
    log_flush_interval: float
    log_batch_size: int
    raw: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return env.get(name, _BY_NAME[name].default).strip()

        def number(name: str, kind=float, minimum: float = 0):
            text = get(name)
            try:
                value = kind(text)
            except ValueError:
                raise SettingsError(f"{name}={text!r} is not a number") from None
            if value < minimum:
                raise SettingsError(f"{name}={text!r} must be at least {minimum}")
            return value

        def boolean(name: str) -> bool:
            text = get(name).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise SettingsError(f"{name}={text!r} is not true or false")

        def choice(name: str, options: tuple[str, ...]) -> str:
            text = get(name).lower()
            if text not in options:
                raise SettingsError(f"{name}={text!r} must be one of {', '.join(options)}")
            return text

        store = choice("SEKISHO_STORE", ("sqlite", "cosmos"))
        settings = cls(
            azure_openai_endpoint=get("AZURE_OPENAI_ENDPOINT").rstrip("/"),
            azure_openai_api_key=get("AZURE_OPENAI_API_KEY"),
            azure_openai_api_version=get("AZURE_OPENAI_API_VERSION"),
            upstream_connect_timeout=number("SEKISHO_UPSTREAM_CONNECT_TIMEOUT_SECONDS", minimum=0.1),
            upstream_read_timeout=number("SEKISHO_UPSTREAM_READ_TIMEOUT_SECONDS", minimum=0.1),
            upstream_max_connections=number("SEKISHO_UPSTREAM_MAX_CONNECTIONS", int, 1),
            max_body_bytes=number("SEKISHO_MAX_BODY_BYTES", int, 1024),
            store=store,
            sqlite_path=get("SEKISHO_SQLITE_PATH"),
            cosmos_endpoint=get("SEKISHO_COSMOS_ENDPOINT"),
            cosmos_key=get("SEKISHO_COSMOS_KEY"),
            cosmos_database=get("SEKISHO_COSMOS_DATABASE"),
            cosmos_verify_tls=boolean("SEKISHO_COSMOS_VERIFY_TLS"),
            log_content=choice("SEKISHO_LOG_CONTENT", ("full", "redacted", "metadata")),
            log_retention_days=number("SEKISHO_LOG_RETENTION_DAYS", int, 1),
            log_flush_interval=number("SEKISHO_LOG_FLUSH_INTERVAL_MS", float, 1) / 1000.0,
            log_batch_size=number("SEKISHO_LOG_BATCH_SIZE", int, 1),
            raw=dict(env),
        )
        if store == "cosmos" and not settings.cosmos_endpoint:
            raise SettingsError("SEKISHO_STORE=cosmos needs SEKISHO_COSMOS_ENDPOINT")
        if not settings.azure_openai_endpoint:
            raise SettingsError("AZURE_OPENAI_ENDPOINT is not set (the local host sets it to its simulator)")
        return settings
