"""A Schemathesis check of the gateway's own, loaded by tests/test_contract.py (SCHEMATHESIS_HOOKS).

The app routes' bodies are Azure OpenAI's: the document states every field the gateway reads and
every limit it enforces, and lets every other field through (`additionalProperties`), since Azure
OpenAI validates those itself — model by model, api-version by api-version — and its 400 reaches
the client unchanged. So "a schema-valid request is accepted" means, for these routes: the
gateway itself refuses none. Whether Azure accepts it is Azure's contract, not this document's.

A refusal is the gateway's own when the answer carries no `x-sekisho-backend` header: the gateway
sets it on every answer it relayed from a backend, error or not. Everything else is Schemathesis'
built-in positive-data-acceptance check, statuses included (tests/schemathesis.toml turns the
built-in off for the app routes, and this one stands in for it there).
"""
from __future__ import annotations

import schemathesis

# What a valid request may be answered besides 2xx/3xx: the caller's credentials or policy (401,
# 403), an object that does not exist (404), a replay-only cache miss (409), quota (429).
ACCEPTED = {401, 403, 404, 409, 412, 429}


@schemathesis.check
def gateway_accepts_what_its_document_allows(ctx, response, case) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    if "admin" in (case.operation.definition.raw.get("tags") or []):
        return None  # admin routes: the built-in check runs there
    status = response.status_code
    if status < 400 or status in ACCEPTED or status >= 500:  # 5xx: the not_a_server_error check
        return None
    if "x-sekisho-backend" in response.headers:
        return None  # Azure OpenAI's own refusal of a field it owns, passed through
    raise AssertionError(
        f"The gateway refused a request its document calls valid: {status} {response.text[:300]}"
    )
