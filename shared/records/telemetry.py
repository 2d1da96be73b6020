"""Usage telemetry: one event per finished request to Application Insights.

The event is a log record of the `sekisho.usage` logger with the message `sekisho.request` and
the fields of `USAGE_EVENT_FIELDS` as attributes; azure-monitor-opentelemetry exports it to the
`traces` table with those fields in `customDimensions` (the workbook in infra/workbook queries
exactly these names; a test holds the two together). Never prompt or response text: the event
is built from the log record by picking fields, so content cannot slip in.

Logs with custom dimensions rather than metrics: per-app, per-user, per-request questions need
dimensions that would make metrics high-cardinality. Off unless
APPLICATIONINSIGHTS_CONNECTION_STRING is set (locally it is not).
"""
from __future__ import annotations

import logging
from typing import Any

from ..settings import Settings

EVENT_NAME = "sekisho.request"
USAGE_LOGGER = "sekisho.usage"

# The one list of telemetry field names (workbook queries are checked against it).
USAGE_EVENT_FIELDS: tuple[str, ...] = (
    "request_id", "request_time", "app_id", "app_name", "user_id", "deployment", "model", "operation", "stream",
    "status", "error_code", "prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens", "cost",
    "currency", "latency_ms", "upstream_latency_ms", "time_to_first_byte_ms", "cache_status", "saved_cost",
    "retries", "backend", "guard_action", "guard_rules", "job_status", "settles_kind", "settles_id",
    "safety_action", "safety_categories", "safety_latency_ms",
    # OpenTelemetry's GenAI semantic conventions, beside the gateway's own names, so that tools
    # that know them (Application Insights' and others' GenAI views) read the events as they are.
    "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.system", "gen_ai.request.model", "gen_ai.response.model",
    "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "error.type",
)
# Budget alerts (quota/alerts.py): one event per threshold crossed, for the Bicep's alert rule.
ALERT_EVENT_NAME = "sekisho.budget_alert"
ALERT_EVENT_FIELDS: tuple[str, ...] = (
    "alert_id", "app_id", "user_id", "scope", "metric", "window", "threshold_percent", "used", "limit", "unit",
    "position_percent", "reason", "crossed_at",
)
# The GenAI conventions' metrics: histograms of tokens (by gen_ai.token.type) and of durations.
TOKEN_USAGE_METRIC, DURATION_METRIC = "gen_ai.client.token.usage", "gen_ai.client.operation.duration"
PROVIDER = "azure.ai.openai"  # gen_ai.provider.name; the older gen_ai.system spelt it az.ai.openai
# The conventions' operation names, for the gateway's operations that have one.
GEN_AI_OPERATIONS = {
    "chat.completions": "chat", "completions": "text_completion", "embeddings": "embeddings", "responses": "chat",
    "audio.transcriptions": "generate_content", "audio.translations": "generate_content", "audio.speech": "generate_content",
    "images.generations": "generate_content", "images.edits": "generate_content",
}

logger = logging.getLogger(USAGE_LOGGER)
logger.setLevel(logging.INFO)
# Only the exporter below takes these events: the Functions host's own log forwarding (and the
# root logger locally) would otherwise duplicate every request as a plain trace.
logger.propagate = False

_configured = False


def is_final(record: dict[str, Any]) -> bool:
    """A record that ends a request. The 202 that submits an async job is replaced later by the
    job's own record, which is the one that counts (telemetry and roll-ups)."""
    return not (record.get("status") == 202 and record.get("job"))


def usage_event(record: dict[str, Any]) -> dict[str, Any]:
    """The event's attributes, from a request log record: metadata only."""
    usage = record.get("usage") or {}
    cost = record.get("cost") or {}
    cache = record.get("cache") or {}
    guard = record.get("guard") or []
    actions = {d.get("action") for d in guard}
    event = {
        "request_id": record.get("id"),
        "request_time": record.get("timestamp"),
        "app_id": record.get("app_id"),
        "app_name": record.get("app_name"),
        "user_id": record.get("user_id"),
        "deployment": record.get("deployment"),
        "model": record.get("model"),
        "operation": record.get("operation"),
        "stream": bool(record.get("stream")),
        "status": record.get("status"),
        "error_code": (record.get("error") or {}).get("code"),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "cached_tokens": usage.get("cached_tokens", 0),
        "total_tokens": usage.get("total_tokens", 0),
        "cost": float(cost.get("amount") or 0.0),
        "currency": cost.get("currency"),
        "latency_ms": record.get("latency_ms"),
        "upstream_latency_ms": record.get("upstream_latency_ms"),
        "time_to_first_byte_ms": record.get("time_to_first_byte_ms"),
        "cache_status": cache.get("status"),
        "saved_cost": float(cache.get("saved_cost") or 0.0),
        "retries": record.get("retries", 0),
        "backend": record.get("backend"),
        "guard_action": "block" if "block" in actions else ("redact" if actions else "none"),
        "guard_rules": ",".join(sorted({str(d.get("rule")) for d in guard if d.get("rule")})),
        "job_status": (record.get("job") or {}).get("status"),
        "settles_kind": (record.get("settles") or {}).get("kind"),  # a batch line or a background response
        "settles_id": (record.get("settles") or {}).get("id"),  # the batch or response id
        **_safety(record.get("safety")),
        **gen_ai_attributes(record),
    }
    # OpenTelemetry attributes cannot be None; absent is clearer than "None" in KQL.
    return {k: v for k, v in event.items() if v is not None}


def gen_ai_attributes(record: dict[str, Any]) -> dict[str, Any]:
    """The request in the GenAI semantic conventions' attributes (metadata only, never content)."""
    usage = record.get("usage") or {}
    attributes = {
        "gen_ai.operation.name": GEN_AI_OPERATIONS.get(record.get("operation") or "", record.get("operation")),
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.system": "az.ai.openai",
        "gen_ai.request.model": record.get("deployment"),
        "gen_ai.response.model": record.get("model"),
        "gen_ai.usage.input_tokens": int(usage.get("prompt_tokens") or 0),
        "gen_ai.usage.output_tokens": int(usage.get("completion_tokens") or 0),
    }
    if (record.get("status") or 0) >= 400:
        attributes["error.type"] = (record.get("error") or {}).get("code") or str(record.get("status"))
    return attributes


_instruments: tuple[Any, Any] | None = None


def _make_histograms(meter) -> tuple[Any, Any]:
    return (
        meter.create_histogram(TOKEN_USAGE_METRIC, unit="{token}", description="Tokens used per request, by gen_ai.token.type"),
        meter.create_histogram(DURATION_METRIC, unit="s", description="Time a request took, end to end through the gateway"),
    )


def _histograms(meter=None) -> tuple[Any, Any]:
    """The two histograms: on `meter` (a test's), or on the global meter provider's (Azure
    Monitor's once `configure` has run), made once."""
    global _instruments
    if meter is not None:
        return _make_histograms(meter)
    if _instruments is None:
        from opentelemetry import metrics

        _instruments = _make_histograms(metrics.get_meter("sekisho"))
    return _instruments


def record_metrics(record: dict[str, Any], meter=None) -> None:
    """A final record into the GenAI conventions' histograms."""
    tokens, duration = _histograms(meter)
    attributes = {k: v for k, v in gen_ai_attributes(record).items()
                  if k in ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model", "error.type") and v is not None}
    usage = record.get("usage") or {}
    for kind, name in (("input", "prompt_tokens"), ("output", "completion_tokens")):
        if usage.get(name):
            tokens.record(int(usage[name]), {**attributes, "gen_ai.token.type": kind})
    if record.get("latency_ms") is not None:
        duration.record(float(record["latency_ms"]) / 1000, attributes)


def _safety(decisions: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Content Safety in one line: blocked, failed (and what that led to), or passed; the
    categories that blocked; the slowest check. Never the analysed text (the record has none)."""
    if not decisions:
        return {}
    actions = {d.get("action") for d in decisions}
    action = "block" if "block" in actions else "unavailable_refused" if "refuse" in actions else \
        "unavailable_continued" if "continue" in actions else "pass"
    categories = sorted({c for d in decisions for c in d.get("categories") or ()})
    latencies = [d["latency_ms"] for d in decisions if isinstance(d.get("latency_ms"), (int, float))]
    return {"safety_action": action, "safety_categories": ",".join(categories),
            "safety_latency_ms": max(latencies) if latencies else None}


def emit(record: dict[str, Any]) -> None:
    if logger.handlers and is_final(record):  # handlers: the exporter (configure) or a test's
        logger.info(EVENT_NAME, extra=usage_event(record))
        if _configured:
            record_metrics(record)


def alert_event(doc: dict[str, Any]) -> dict[str, Any]:
    event = {name: doc.get(name) for name in ALERT_EVENT_FIELDS if name != "alert_id"}
    event["alert_id"] = doc.get("id")
    return {k: v for k, v in event.items() if v is not None}


def emit_alert(doc: dict[str, Any]) -> None:
    if logger.handlers:
        logger.warning(ALERT_EVENT_NAME, extra=alert_event(doc))


def configure(settings: Settings) -> bool:
    """Export usage events to Application Insights when a connection string is set. Only the
    usage logger is exported; instrumentations are off (the Functions host records requests)."""
    global _configured
    if _configured or not settings.appinsights_connection_string:
        return _configured
    from azure.monitor.opentelemetry import configure_azure_monitor

    credential = None
    if "AAD" in settings.appinsights_authentication_string:
        # "Authorization=AAD;ClientId=<id>": local auth is off on the component; use the identity.
        from azure.identity import ManagedIdentityCredential

        parts = dict(p.split("=", 1) for p in settings.appinsights_authentication_string.split(";") if "=" in p)
        credential = ManagedIdentityCredential(client_id=parts.get("ClientId") or None)
    configure_azure_monitor(
        connection_string=settings.appinsights_connection_string, credential=credential, logger_name=USAGE_LOGGER,
        disable_tracing=True, disable_metrics=False,  # the GenAI histograms (record_metrics)
        instrumentation_options={name: {"enabled": False} for name in
                                 ("azure_sdk", "django", "fastapi", "flask", "psycopg2", "requests", "urllib", "urllib3")},
    )
    _configured = True
    return True
