"""Settings read from the environment (Function App settings in Azure, env vars locally).

Every name the gateway reads is declared here, once, in `SETTINGS`. The test suite checks that
`local.settings.sample.json` lists exactly these names, so the sample stays complete.
"""
from __future__ import annotations

import os
import tempfile
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
    Setting("TIKTOKEN_CACHE_DIR", "", "Where tiktoken reads its BPE rank files (its own setting). Empty = a folder of the process under the temp directory, filled from the files bundled in shared/quota/bpe/ (checked against tiktoken's pinned hashes)."),
    Setting("AZURE_OPENAI_V1_ROUTES", "true", "Whether AZURE_OPENAI_ENDPOINT serves the v1 API (/openai/v1/...). false: v1 calls are sent to its deployment routes instead (older resources, Azure-compatible servers without v1)."),
    Setting("AZURE_CLIENT_ID", "", "Client id of the user-assigned managed identity (read by azure-identity)."),
    Setting("SEKISHO_UPSTREAM_CONNECT_TIMEOUT_SECONDS", "10", "Time allowed to open a connection to the upstream."),
    Setting("SEKISHO_UPSTREAM_READ_TIMEOUT_SECONDS", "220", "Longest silence allowed from the upstream (first byte, or between stream chunks); below the 230 s that Azure allows an HTTP response to start."),
    Setting("SEKISHO_UPSTREAM_MAX_CONNECTIONS", "256", "Size of the pooled upstream connection pool."),
    Setting("SEKISHO_CIRCUIT_FAILURES", "5", "Consecutive failures (5xx, unreachable, timeout) after which a backend is skipped."),
    Setting("SEKISHO_CIRCUIT_OPEN_SECONDS", "10", "How long a failing backend is skipped before one request probes it (when every backend is paused: 502 with Retry-After)."),
    Setting("SEKISHO_PUBLIC_BASE_URL", "", "The gateway's address as clients reach it, e.g. https://ai.contoso.com (a path prefix is kept). Status URLs of async jobs are built from it, never from a request's Host header (behind the Functions host, a function sees the worker's own loopback address). Empty = https://<WEBSITE_HOSTNAME> in Azure; elsewhere status URLs are paths, relative to the address the client called."),
    Setting("WEBSITE_HOSTNAME", "", "Set by Azure: the function app's default host name (used when SEKISHO_PUBLIC_BASE_URL is empty)."),
    Setting("SEKISHO_MAX_BODY_BYTES", "8388608", "Largest request body accepted (413 above)."),
    Setting("SEKISHO_MAX_UPLOAD_BYTES", "26214400", "Largest multipart body (audio and image uploads) accepted, in bytes; larger ones get 413."),
    Setting("SEKISHO_CONTENT_SAFETY_ENDPOINT", "", "Azure AI Content Safety endpoint, e.g. https://<name>.cognitiveservices.azure.com, for apps whose policy turns content_safety on. Empty = unavailable (such apps then follow their on_failure). The local host sets its simulator's."),
    Setting("SEKISHO_CONTENT_SAFETY_API_KEY", "", "Content Safety key. Empty = Entra ID (managed identity, Cognitive Services User), the production choice; the resource has local auth off."),
    Setting("SEKISHO_STORE", "sqlite", "Store adapter: sqlite or cosmos."),
    Setting("SEKISHO_SQLITE_PATH", ".data/sekisho.db", "SQLite database file (sqlite store)."),
    Setting("SEKISHO_COSMOS_ENDPOINT", "", "Cosmos DB account endpoint (cosmos store)."),
    Setting("SEKISHO_COSMOS_KEY", "", "Cosmos DB key. Empty = Entra ID (managed identity), the production choice."),
    Setting("SEKISHO_COSMOS_DATABASE", "sekisho", "Cosmos DB database name."),
    Setting("SEKISHO_COSMOS_VERIFY_TLS", "true", "Verify the Cosmos endpoint's TLS certificate (false only for a local emulator)."),
    Setting("SEKISHO_AUTH_TENANT_IDS", "", "Entra tenant ids whose tokens are accepted (comma-separated). Required; the local host sets its own."),
    Setting("SEKISHO_AUTH_AUDIENCES", "", "Accepted token audiences: the gateway app registration's client id and App ID URI (comma-separated). Required."),
    Setting("SEKISHO_AUTH_AUTHORITY", "https://login.microsoftonline.com", "Where OpenID discovery documents and signing keys are fetched from."),
    Setting("SEKISHO_AUTH_LEEWAY_SECONDS", "60", "Clock skew allowed on token exp/nbf."),
    Setting("SEKISHO_JWKS_MIN_REFRESH_SECONDS", "60", "Least time between two signing-key fetches for one tenant (unknown kid floods)."),
    Setting("SEKISHO_GATEWAY_KEY_PEPPER", "", "Pepper of the gateway keys' hashes (a Key Vault reference in Azure). Empty = gateway keys are refused (401 invalid_api_key). Changing it invalidates every key."),
    Setting("SEKISHO_EASY_AUTH_ENABLED", "false", "Trust X-MS-CLIENT-PRINCIPAL from App Service Authentication. Only when Easy Auth is on for the app; otherwise the header could be forged."),
    Setting("SEKISHO_ADMIN_ROLE", "Sekisho.Admin", "App role that unlocks the admin API."),
    Setting("SEKISHO_ALLOW_UNREGISTERED_APPS", "false", "Serve apps that have no policy with the default policy (otherwise 403)."),
    Setting("SEKISHO_POLICY_CACHE_SECONDS", "10", "How long a policy read from the store is reused in memory."),
    Setting("SEKISHO_DEPLOYMENTS", "", "Deployments the upstream serves (comma-separated), listed by GET /openai/v1/models for apps allowed '*'."),
    Setting("SEKISHO_QUOTA_TIMEZONE", "UTC", "Time zone whose calendar aligns quota windows (minute, day, month), e.g. Asia/Tokyo."),
    Setting("SEKISHO_QUOTA_LEASE_SHARE", "0.02", "Share of a quota limit an instance reserves at once and spends in memory while the counter is below half its limit (saves a store call per request; unspent units go back after 1 s idle). 0 = every request reserves in the store."),
    Setting("SEKISHO_CURRENCY", "USD", "Currency of prices and spend limits."),
    Setting("SEKISHO_ALERT_WEBHOOK_URL", "", "Where the gateway POSTs budget alerts (JSON, signed; retried with back-off). Empty = alerts go to Application Insights (and the Bicep's action group) only."),
    Setting("SEKISHO_ALERT_WEBHOOK_SECRET", "", "HMAC-SHA256 key that signs budget alert webhooks (x-sekisho-signature); a Key Vault reference in Azure. Required with SEKISHO_ALERT_WEBHOOK_URL."),
    Setting("SEKISHO_CACHE_MAX_ENTRY_BYTES", "1048576", "Largest answer the response cache keeps (bigger ones are not cached)."),
    Setting("SEKISHO_LOG_CONTENT", "full", "Content kept in request logs: full, redacted or metadata."),
    Setting("SEKISHO_LOG_RETENTION_DAYS", "30", "Request log retention (TTL) in days."),
    Setting("SEKISHO_LOG_FLUSH_INTERVAL_MS", "100", "Longest time a log record waits in memory before it is written."),
    Setting("SEKISHO_LOG_BATCH_SIZE", "200", "Most log records written in one batch."),
    Setting("SEKISHO_LOG_SPOOL_DIR", "", "Local folder for request log records the store could not take (replayed by the next start). Empty = <temp dir>/sekisho-log-spool."),
    Setting("APPLICATIONINSIGHTS_CONNECTION_STRING", "", "Application Insights connection string: usage events (one per request) are exported there. Empty = no telemetry (local)."),
    Setting("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "", "`Authorization=AAD;ClientId=<identity client id>` when the Application Insights component has local auth off."),
    Setting("AzureWebJobsStorage", "", "Functions host storage as a connection string (local: UseDevelopmentStorage=true for Azurite). Async jobs are queued on its `sekisho-jobs` queue."),
    Setting("AzureWebJobsStorage__accountName", "", "Functions host storage account for identity-based access (Azure; no keys). Async jobs are queued on its `sekisho-jobs` queue."),
    Setting("SEKISHO_LOCAL_QUEUE_URL", "", "Local host only (it sets this itself): where async jobs' start messages are put instead of a Storage queue."),
    Setting("AzureWebJobsStorage__clientId", "", "Client id of the user-assigned identity used for the host storage (identity-based access)."),
)

_BY_NAME = {s.name: s for s in SETTINGS}


class SettingsError(ValueError):
    """A setting has a value the gateway cannot use; raised at start, never per request."""


@dataclass(frozen=True)
class Settings:
    azure_openai_endpoint: str
    azure_openai_api_key: str
    azure_openai_api_version: str
    azure_openai_v1_routes: bool
    upstream_connect_timeout: float
    upstream_read_timeout: float
    upstream_max_connections: int
    circuit_failures: int
    circuit_open_seconds: float
    max_body_bytes: int
    max_upload_bytes: int
    store: str
    sqlite_path: str
    cosmos_endpoint: str
    cosmos_key: str
    cosmos_database: str
    cosmos_verify_tls: bool
    auth_tenant_ids: tuple[str, ...]
    auth_audiences: tuple[str, ...]
    auth_authority: str
    auth_leeway_seconds: float
    jwks_min_refresh_seconds: float
    easy_auth_enabled: bool
    gateway_key_pepper: str
    admin_role: str
    allow_unregistered_apps: bool
    policy_cache_seconds: float
    deployments: tuple[str, ...]
    quota_timezone: str
    quota_lease_share: float
    currency: str
    cache_max_entry_bytes: int
    log_content: str
    log_retention_days: int
    log_flush_interval: float
    log_batch_size: int
    webjobs_storage: str = ""
    log_spool_dir: str = ""
    appinsights_connection_string: str = ""
    appinsights_authentication_string: str = ""
    webjobs_storage_account: str = ""
    webjobs_storage_client_id: str = ""
    public_base_url: str = ""
    content_safety_endpoint: str = ""
    content_safety_api_key: str = ""
    local_queue_url: str = ""
    alert_webhook_url: str = ""
    alert_webhook_secret: str = ""
    raw: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, serving: bool = True) -> "Settings":
        """Read and check the settings. `serving=False` (the CLI) skips the checks that only
        matter when answering requests (upstream endpoint, token validation)."""
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

        def items(name: str) -> tuple[str, ...]:
            return tuple(part.strip() for part in get(name).split(",") if part.strip())

        def timezone(name: str) -> str:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            text = get(name)
            try:
                ZoneInfo(text)
            except (ZoneInfoNotFoundError, ValueError):
                raise SettingsError(f"{name}={text!r} is not an IANA time zone (e.g. UTC, Asia/Tokyo)") from None
            return text

        store = choice("SEKISHO_STORE", ("sqlite", "cosmos"))
        settings = cls(
            azure_openai_endpoint=get("AZURE_OPENAI_ENDPOINT").rstrip("/"),
            azure_openai_api_key=get("AZURE_OPENAI_API_KEY"),
            azure_openai_api_version=get("AZURE_OPENAI_API_VERSION"),
            azure_openai_v1_routes=boolean("AZURE_OPENAI_V1_ROUTES"),
            upstream_connect_timeout=number("SEKISHO_UPSTREAM_CONNECT_TIMEOUT_SECONDS", minimum=0.1),
            upstream_read_timeout=number("SEKISHO_UPSTREAM_READ_TIMEOUT_SECONDS", minimum=0.1),
            upstream_max_connections=number("SEKISHO_UPSTREAM_MAX_CONNECTIONS", int, 1),
            circuit_failures=number("SEKISHO_CIRCUIT_FAILURES", int, 1),
            circuit_open_seconds=number("SEKISHO_CIRCUIT_OPEN_SECONDS", float, 0.1),
            max_body_bytes=number("SEKISHO_MAX_BODY_BYTES", int, 1024),
            max_upload_bytes=number("SEKISHO_MAX_UPLOAD_BYTES", int, 1024),
            store=store,
            sqlite_path=get("SEKISHO_SQLITE_PATH"),
            cosmos_endpoint=get("SEKISHO_COSMOS_ENDPOINT"),
            cosmos_key=get("SEKISHO_COSMOS_KEY"),
            cosmos_database=get("SEKISHO_COSMOS_DATABASE"),
            cosmos_verify_tls=boolean("SEKISHO_COSMOS_VERIFY_TLS"),
            auth_tenant_ids=items("SEKISHO_AUTH_TENANT_IDS"),
            auth_audiences=items("SEKISHO_AUTH_AUDIENCES"),
            auth_authority=get("SEKISHO_AUTH_AUTHORITY").rstrip("/"),
            auth_leeway_seconds=number("SEKISHO_AUTH_LEEWAY_SECONDS"),
            jwks_min_refresh_seconds=number("SEKISHO_JWKS_MIN_REFRESH_SECONDS"),
            easy_auth_enabled=boolean("SEKISHO_EASY_AUTH_ENABLED"),
            gateway_key_pepper=get("SEKISHO_GATEWAY_KEY_PEPPER"),
            admin_role=get("SEKISHO_ADMIN_ROLE"),
            allow_unregistered_apps=boolean("SEKISHO_ALLOW_UNREGISTERED_APPS"),
            policy_cache_seconds=number("SEKISHO_POLICY_CACHE_SECONDS"),
            deployments=items("SEKISHO_DEPLOYMENTS"),
            quota_timezone=timezone("SEKISHO_QUOTA_TIMEZONE"),
            quota_lease_share=number("SEKISHO_QUOTA_LEASE_SHARE"),
            currency=get("SEKISHO_CURRENCY").upper(),
            cache_max_entry_bytes=number("SEKISHO_CACHE_MAX_ENTRY_BYTES", int, 1024),
            log_content=choice("SEKISHO_LOG_CONTENT", ("full", "redacted", "metadata")),
            log_retention_days=number("SEKISHO_LOG_RETENTION_DAYS", int, 1),
            log_flush_interval=number("SEKISHO_LOG_FLUSH_INTERVAL_MS", float, 1) / 1000.0,
            log_batch_size=number("SEKISHO_LOG_BATCH_SIZE", int, 1),
            webjobs_storage=get("AzureWebJobsStorage"),
            log_spool_dir=get("SEKISHO_LOG_SPOOL_DIR") or os.path.join(tempfile.gettempdir(), "sekisho-log-spool"),
            appinsights_connection_string=get("APPLICATIONINSIGHTS_CONNECTION_STRING"),
            appinsights_authentication_string=get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING"),
            webjobs_storage_account=get("AzureWebJobsStorage__accountName"),
            webjobs_storage_client_id=get("AzureWebJobsStorage__clientId"),
            local_queue_url=get("SEKISHO_LOCAL_QUEUE_URL"),
            content_safety_endpoint=get("SEKISHO_CONTENT_SAFETY_ENDPOINT").rstrip("/"),
            content_safety_api_key=get("SEKISHO_CONTENT_SAFETY_API_KEY"),
            alert_webhook_url=get("SEKISHO_ALERT_WEBHOOK_URL"),
            alert_webhook_secret=get("SEKISHO_ALERT_WEBHOOK_SECRET"),
            public_base_url=_public_base_url(get("SEKISHO_PUBLIC_BASE_URL"), get("WEBSITE_HOSTNAME")),
            raw=dict(env),
        )
        if settings.quota_lease_share > 0.1:
            raise SettingsError("SEKISHO_QUOTA_LEASE_SHARE must be between 0 and 0.1 (a share of each limit per instance)")
        if store == "cosmos" and not settings.cosmos_endpoint:
            raise SettingsError("SEKISHO_STORE=cosmos needs SEKISHO_COSMOS_ENDPOINT")
        if settings.alert_webhook_url and not settings.alert_webhook_url.startswith(("https://", "http://")):
            raise SettingsError("SEKISHO_ALERT_WEBHOOK_URL must be an http(s) URL")
        if settings.alert_webhook_url and len(settings.alert_webhook_secret) < 16:
            raise SettingsError("SEKISHO_ALERT_WEBHOOK_URL needs SEKISHO_ALERT_WEBHOOK_SECRET (16 characters or more) to sign alerts")
        if not serving:
            return settings
        if not settings.auth_tenant_ids and not settings.easy_auth_enabled:
            raise SettingsError("SEKISHO_AUTH_TENANT_IDS is not set: no caller could be authenticated")
        if settings.auth_tenant_ids and not settings.auth_audiences:
            raise SettingsError("SEKISHO_AUTH_AUDIENCES is not set: tokens for any audience would be accepted")
        if not settings.azure_openai_endpoint:
            raise SettingsError("AZURE_OPENAI_ENDPOINT is not set (the local host sets it to its simulator)")
        return settings


def _public_base_url(configured: str, website_hostname: str) -> str:
    from urllib.parse import urlsplit

    if not configured:
        return f"https://{website_hostname}" if website_hostname else ""
    parts = urlsplit(configured)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise SettingsError(f"SEKISHO_PUBLIC_BASE_URL={configured!r} is not an http(s) base URL (scheme, host, optional path)")
    return configured.rstrip("/")


# Functions platform settings that the sample carries beside Sekisho's own.
PLATFORM_SAMPLE = {
    "FUNCTIONS_WORKER_RUNTIME": "python",
    "PYTHON_ENABLE_INIT_INDEXING": "1",  # needed by the HTTP streaming extension on Python <= 3.12
}
_SAMPLE_VALUES = {
    "AZURE_OPENAI_ENDPOINT": "https://<your-resource>.openai.azure.com",
    "SEKISHO_AUTH_TENANT_IDS": "<your-tenant-id>",
    "SEKISHO_AUTH_AUDIENCES": "<gateway-client-id>,api://<gateway-client-id>",
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
}


def sample_settings() -> dict:
    """The content of local.settings.sample.json (regenerate: python -m shared.settings)."""
    values = dict(PLATFORM_SAMPLE)
    for setting in SETTINGS:
        values[setting.name] = _SAMPLE_VALUES.get(setting.name, setting.default)
    return {"IsEncrypted": False, "Values": values}


def markdown_table() -> str:
    """The README's settings table (regenerate: python -m shared.settings --markdown)."""
    lines = ["| Setting | Default | What it does |", "|---|---|---|"]
    for setting in SETTINGS:
        default = f"`{setting.default}`" if setting.default else "—"
        lines.append(f"| `{setting.name}` | {default} | {setting.description} |")
    return "\n".join(lines)


README_START = "<!-- settings:start (python -m shared.settings --markdown) -->\n"
README_END = "\n<!-- settings:end -->"


def update_readme(path: str = "README.md") -> None:
    """Rewrite the settings table between the README's markers."""
    from pathlib import Path

    text = Path(path).read_text()
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    Path(path).write_text(head + README_START + markdown_table() + README_END + tail)


if __name__ == "__main__":
    import json
    import sys

    if "--update-docs" in sys.argv:  # README table and local.settings.sample.json
        update_readme()
        with open("local.settings.sample.json", "w") as sample:
            sample.write(json.dumps(sample_settings(), indent=2) + "\n")
    else:
        print(markdown_table() if "--markdown" in sys.argv else json.dumps(sample_settings(), indent=2))
