"""The admin API: policies and the request log, for callers with the admin app role.

`PolicyService` holds the rules for changing policies (validation, ETags, cache invalidation);
the HTTP handlers here and the CLI both go through it, so both validate input the same way.
"""
from __future__ import annotations

import functools
from dataclasses import replace
import logging
from pathlib import Path
from typing import Any, Callable

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse

from .. import errors
from ..errors import GatewayError
from ..identity.authenticate import Authenticator
from ..policy.access import PolicyCache, forbidden, require_admin
from ..policy.policies import (
    APP_DOC_ID, DEFAULTS_ID, DEFAULTS_PARTITION, PolicyError, build_document, check_id, describe_validation_error, user_doc_id,
    PolicyConflict, repeated, validate_admin_input,
)
from ..cache.responses import cache_scope
from ..quota import alerts as budget_alerts
from ..quota.alerts import ALERT_DELIVERY_STATES, ALERTED_METRICS
from ..records import focus, rollups
from ..records import request_log
from ..store import AlreadyExists, LogQuery, PreconditionFailed, Store
from ..store.base import MAX_LOG_PAGE, log_cursor, read_log_cursor
from ..validation import page_limit
from . import sessions as admin_sessions
from .charts import bar_chart

logger = logging.getLogger("sekisho.admin")


def _locate(kind: str, app_id: str | None, user_id: str | None) -> tuple[str, str]:
    if kind == "defaults":
        return DEFAULTS_PARTITION, DEFAULTS_ID
    check_id(app_id, "app id")
    if kind == "app":
        return app_id, APP_DOC_ID
    return app_id, user_doc_id(check_id(user_id, "user id"))


class PolicyService:
    def __init__(self, store: Store, cache: PolicyCache | None = None) -> None:
        self._store = store
        self._cache = cache

    async def get(self, kind: str, app_id: str | None = None, user_id: str | None = None) -> dict[str, Any] | None:
        partition, doc_id = _locate(kind, app_id, user_id)
        return await self._store.get_policy(partition, doc_id)

    async def list(self, app_id: str | None = None) -> list[dict[str, Any]]:
        return await self._store.list_policies(app_id)

    async def put(
        self, kind: str, app_id: str | None, user_id: str | None, data: Any, *,
        actor: str | None, if_match: str | None = None, create_only: bool = False,
    ) -> tuple[dict[str, Any], bool]:
        """Create or replace a layer; returns (document, created)."""
        if not isinstance(data, dict):
            raise PolicyError("Invalid policy: the body must be a JSON object")
        if kind != "defaults":
            check_id(app_id, "app id")
        doc = build_document(kind, app_id, user_id, data, actor)
        existed = await self._store.get_policy(doc.app_id, doc.id) is not None
        stored = await self._store.put_policy(doc.to_store(), if_match=if_match, create_only=create_only)
        if self._cache is not None:
            self._cache.invalidate(doc.app_id)
        logger.info("policy %s/%s written by %s", doc.app_id, doc.id, actor)
        return stored, not existed

    async def delete(self, kind: str, app_id: str | None, user_id: str | None, *, actor: str | None, if_match: str | None = None) -> bool:
        partition, doc_id = _locate(kind, app_id, user_id)
        deleted = await self._store.delete_policy(partition, doc_id, if_match=if_match)
        if self._cache is not None:
            self._cache.invalidate(partition)
        logger.info("policy %s/%s deleted by %s", partition, doc_id, actor)
        return deleted


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, headers=headers, media_type="application/json")


def _error(error: GatewayError) -> Response:
    return Response(error.body(), status_code=error.status, headers=error.headers, media_type="application/json")


class UsageService:
    """Current quota use against limits, per app or user, and resets. Shared by the API and the CLI."""

    def __init__(self, store: Store, resolver, windows, currency: str) -> None:
        self._store = store
        self._resolver = resolver
        self._windows = windows
        self._currency = currency
        # The serving gateway forgets its own quota leases of a reset subject (quota_leases.py).
        self.on_reset: Callable[[str], None] | None = None

    def _subject(self, app_id: str, user_id: str | None) -> str:
        check_id(app_id, "app id")
        return f"app:{app_id}" if user_id is None else f"user:{app_id}:{check_id(user_id, 'user id')}"

    async def show(self, app_id: str, user_id: str | None = None) -> dict[str, Any]:
        from ..quota.enforce import METRICS, METRICS_BY_NAME

        policy = await self._resolver.resolve(app_id, user_id)
        limits = policy.app_limits if user_id is None else policy.user_limits
        at = self._windows.now()
        names = {m.name: f"{m.key}:{self._windows.key(m.window, at)}" for m in METRICS}
        subject = self._subject(app_id, user_id)
        used = await self._store.read_counters(subject, list(names.values()))
        # The alerts this window's budgets have raised (one per threshold crossed).
        raised: dict[str, list[int]] = {}
        for alert in await self._store.list_alerts(app_id, 1000):
            if alert.get("subject") == subject and alert.get("window") == self._windows.key(METRICS_BY_NAME[alert["metric"]].window, at):
                raised.setdefault(alert["metric"], []).append(alert["threshold_percent"])
        metrics = {}
        for metric in METRICS:
            value = used[names[metric.name]]
            limit = getattr(limits, metric.name)
            if metric.kind == "spend":
                value = value / 1e9
            metrics[metric.name] = {
                "used": value,
                "limit": limit,
                "remaining": None if limit is None else max(0, limit - value),
                "window": self._windows.key(metric.window, at),
                "resets_in_seconds": self._windows.seconds_left(metric.window, at),
            }
            if metric.name in ALERTED_METRICS and limit is not None:
                metrics[metric.name]["alerts"] = {
                    "thresholds_percent": list(policy.alert_thresholds),
                    "position_percent": round(100 * value / limit, 2) if limit else 100.0,
                    "raised_percent": sorted(raised.get(metric.name, [])),
                }
        return {"app_id": app_id, "user_id": user_id, "currency": self._currency, "timezone": str(self._windows.zone), "metrics": metrics}

    async def reset(self, app_id: str, user_id: str | None, metric_names: list[str] | None) -> list[str]:
        from ..quota.enforce import METRICS, METRICS_BY_NAME

        chosen = metric_names or [m.name for m in METRICS]
        unknown = [n for n in chosen if n not in METRICS_BY_NAME]
        if unknown:
            raise PolicyError(f"unknown metric(s) {unknown}; known: {sorted(METRICS_BY_NAME)}")
        at = self._windows.now()
        counters = [f"{METRICS_BY_NAME[n].key}:{self._windows.key(METRICS_BY_NAME[n].window, at)}" for n in chosen]
        subject = self._subject(app_id, user_id)
        await self._store.reset_counters(subject, counters)
        if self.on_reset is not None:
            self.on_reset(subject)
        logger.info("quota counters %s reset for %s/%s", chosen, app_id, user_id)
        return chosen


class PricingService:
    def __init__(self, store: Store, pricing) -> None:
        self._store = store
        self._pricing = pricing

    async def list(self) -> list[dict[str, Any]]:
        from ..quota.pricing import price_documents

        overridden = {d["id"] for d in await self._store.list_prices()}
        self._pricing.invalidate()
        return price_documents(await self._pricing.prices(), overridden)

    async def put(self, model: str, data: Any) -> dict[str, Any]:
        from ..quota.pricing import Price

        check_id(model, "model")
        price = validate_admin_input(Price, data, "price")
        doc = await self._store.put_price({"id": model.lower(), **price.model_dump()})
        self._pricing.invalidate()
        return doc

    async def delete(self, model: str) -> bool:
        deleted = await self._store.delete_price(model.lower())
        self._pricing.invalidate()
        return deleted


class CacheService:
    """Hit rate and savings per app, and purging an app's entries."""

    def __init__(self, store: Store, resolver, cache) -> None:
        self._store = store
        self._resolver = resolver
        self._cache = cache

    async def stats(self, app_id: str) -> dict[str, Any]:
        check_id(app_id, "app id")
        return await self._cache.stats(app_id)

    async def purge(self, app_id: str) -> dict[str, Any]:
        check_id(app_id, "app id")
        policy = await self._resolver.resolve(app_id, None)
        scope = cache_scope(policy.cache.shared_scope, app_id)
        if self._cache is not None:
            await self._cache.flush_writes()  # entries of this instance still on their way go too
        purged = await self._store.cache_purge(scope)
        logger.info("response cache of scope %s purged (%s entries)", scope, purged)
        return {"scope": scope, "purged": purged}


class DeploymentService:
    """The deployment catalogue: which backends serve each deployment."""

    def __init__(self, store: Store, pool) -> None:
        self._store = store
        self._pool = pool

    async def list(self) -> list[dict[str, Any]]:
        return await self._store.list_deployments()

    async def get(self, name: str) -> dict[str, Any] | None:
        return await self._store.get_deployment(name)

    async def put(self, name: str, data: Any) -> dict[str, Any]:
        from ..upstream.backends import DeploymentSpec

        if not isinstance(data, dict):
            raise PolicyError("Invalid deployment: the body must be a JSON object")
        duplicates = repeated(data.get("backends"), "name")
        if duplicates:
            raise PolicyConflict(f"Backend names must be unique within a deployment: {duplicates}")
        spec = validate_admin_input(DeploymentSpec, {**data, "id": name}, "deployment")
        doc = await self._store.put_deployment(spec.model_dump())
        if self._pool is not None:
            self._pool.invalidate(name)
        logger.info("deployment %s written", name)
        return doc

    def health(self) -> list[dict[str, Any]]:
        """This instance's view of each backend (circuit, cool-down)."""
        return self._pool.status() if self._pool is not None else []

    async def delete(self, name: str) -> bool:
        deleted = await self._store.delete_deployment(name)
        if self._pool is not None:
            self._pool.invalidate(name)
        return deleted


def _new_key(doc: dict[str, Any], key: str) -> Response:
    """A new key's one showing: never cached by anything between here and the admin."""
    return _json({**doc, "key": key}, status=201, headers={"Cache-Control": "no-store"})


class GatewayKeyInput(BaseModel):
    """A new gateway key: a name, and optionally an expiry, deployments narrower than the app's, a fixed end user."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    expires_in_days: float | None = Field(default=None, gt=0, le=3650)
    deployments: list[str] | None = Field(default=None, min_length=1, max_length=100)
    user: str | None = Field(default=None, min_length=1, max_length=128)


def _answers_with_errors(handler):
    """Admin handlers raise; this turns what they raise into OpenAI-shaped error answers."""

    @functools.wraps(handler)
    async def answer(self, request: Request, *args, **kwargs) -> Response:
        try:
            return await handler(self, request, *args, **kwargs)
        except GatewayError as exc:
            return _error(exc)
        except PolicyConflict as exc:
            return _error(GatewayError(409, "conflict", str(exc)))
        except PolicyError as exc:
            return _error(errors.invalid_request(str(exc)))
        except PreconditionFailed as exc:
            return _error(GatewayError(412, "precondition_failed", f"{exc}; read it again and retry with its ETag."))
        except AlreadyExists as exc:
            return _error(GatewayError(409, "conflict", str(exc)))
        except ValidationError as exc:
            return _error(errors.invalid_request(describe_validation_error(exc)))

    return answer


class AdminApi:
    def __init__(self, authenticator: Authenticator, admin_role: str, policies: PolicyService, store: Store,
                 *, resolver=None, pricing=None, windows=None, currency: str = "USD", cache=None, backends=None, keys=None,
                 billing_account: str = "sekisho") -> None:
        self.keys = keys  # identity.gateway_keys.KeyService, when a pepper is configured
        self._authenticator = authenticator
        self._role = admin_role
        self._policies = policies
        self._store = store
        self._currency = currency
        self.usage = UsageService(store, resolver, windows, currency)
        self._resolver = resolver
        self._zone = windows.zone.key if windows is not None else "UTC"
        self._billing_account = billing_account
        self.prices = PricingService(store, pricing)
        self.cache = CacheService(store, resolver, cache)
        self.catalogue = DeploymentService(store, backends)

    async def _admin(self, request: Request):
        session = request.cookies.get(admin_sessions.COOKIE)
        if session and "authorization" not in request.headers and "x-ms-client-principal" not in request.headers:
            # The admin page's own session (local sign-in): read-only, so GET only.
            if request.method != "GET":
                raise forbidden("An admin page session can only read; changes need a bearer token with the admin role.")
            actor = await admin_sessions.session_actor(self._store, session)
            if actor is None:
                raise GatewayError(401, "invalid_token", "The admin session has expired; sign in again.")
            return admin_sessions.SessionIdentity(actor, self._role)
        identity = await self._authenticator.authenticate(request)
        if identity.source == "easy_auth_browser" and request.method != "GET":
            raise forbidden("A browser sign-in can only read; changes need a bearer token with the admin role.")
        require_admin(identity, self._role)
        return identity

    @_answers_with_errors
    async def gateway_keys(self, request: Request, app_id: str, key_id: str | None = None, rotate: bool = False) -> Response:
        """GET: the app's keys (never a secret); POST: a new key, shown once; DELETE …/{key}: revoke;
        POST …/{key}/rotate: a new key, the old one kept for `overlap_seconds` (default 86400)."""
        identity = await self._admin(request)
        check_id(app_id, "app id")
        if self.keys is None:
            raise GatewayError(409, "conflict", "Gateway keys need SEKISHO_GATEWAY_KEY_PEPPER to be set.")
        actor = identity.user_oid or identity.app_id
        if key_id is None and request.method == "GET":
            return _json({"object": "list", "data": await self.keys.list(app_id)})
        if key_id is None:
            body = await self._json_body(request)
            if not isinstance(body, dict):
                raise errors.invalid_request("The body must be a JSON object: {\"name\": …}.")
            spec = validate_admin_input(GatewayKeyInput, body, "gateway key")
            return _new_key(*await self.keys.create(app_id, spec.name, expires_in_days=spec.expires_in_days,
                                                    deployments=spec.deployments, user=spec.user, actor=actor))
        if rotate:
            overlap = (await self._optional_object(request, '{"overlap_seconds": …}')).get("overlap_seconds", 86400)
            if isinstance(overlap, float) and overlap.is_integer():
                overlap = int(overlap)  # 105.0 is a whole number in JSON
            if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= 30 * 86400:
                raise errors.invalid_request("'overlap_seconds' must be a whole number from 0 to 2592000.", "overlap_seconds")
            return _new_key(*await self.keys.rotate(app_id, key_id, overlap, actor=actor))
        return _json(await self.keys.revoke(app_id, key_id, actor=actor))

    @_answers_with_errors
    async def policies(self, request: Request, kind: str | None, app_id: str | None = None, user_id: str | None = None) -> Response:
        """kind None: list; else GET/PUT/DELETE one layer (defaults, app, user)."""
        identity = await self._admin(request)
        actor = identity.user_oid or identity.app_id
        if kind is None:
            app_filter = request.query_params.get("app_id")
            if app_filter is not None:
                _filter_value(app_filter, "app_id")
            return _json({"object": "list", "data": await self._policies.list(app_filter)})
        if request.method == "GET":
            doc = await self._policies.get(kind, app_id, user_id)
            if doc is None:
                raise errors.not_found("No such policy.")
            return _json(doc, headers={"ETag": doc["etag"]})
        # An empty If-Match is an empty list of ETags (RFC 9110): none matches, so 412.
        if_match = request.headers.get("if-match")
        if_none_match = request.headers.get("if-none-match")
        if if_none_match is not None and if_none_match.strip() != "*":
            raise errors.invalid_request('If-None-Match takes only "*" (create, refusing to replace).', "If-None-Match")
        if request.method == "PUT":
            try:
                data = orjson.loads(await request.body())
            except orjson.JSONDecodeError as exc:
                raise errors.invalid_request(f"The request body is not valid JSON: {exc}.") from None
            create_only = if_none_match is not None
            doc, created = await self._policies.put(kind, app_id, user_id, data, actor=actor, if_match=if_match, create_only=create_only)
            return _json(doc, 201 if created else 200, headers={"ETag": doc["etag"]})
        if request.method == "DELETE":
            if not await self._policies.delete(kind, app_id, user_id, actor=actor, if_match=if_match):
                raise errors.not_found("No such policy.")
            return Response(status_code=204)
        raise GatewayError(405, "method_not_allowed", f"{request.method} is not allowed here.")

    async def _json_body(self, request: Request) -> Any:
        raw = await request.body()
        if not raw.strip():
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise errors.invalid_request(f"The request body is not valid JSON: {exc}.") from None

    async def _optional_object(self, request: Request, example: str, null: bool = False) -> dict[str, Any]:
        """A body that may be left out, or else is a JSON object (or `null`, where `null` says so)."""
        raw = await request.body()
        if not raw.strip():
            return {}
        body = await self._json_body(request)
        if body is None and null:
            return {}
        if not isinstance(body, dict):
            raise errors.invalid_request(f"The body must be a JSON object: {example}, or empty.")
        return body

    @_answers_with_errors
    async def usage_view(self, request: Request, app_id: str, user_id: str | None = None, reset: bool = False) -> Response:
        await self._admin(request)
        if reset:
            body = await self._optional_object(request, '{"metrics": […]}', null=True)
            metrics = body.get("metrics")
            if "metrics" in body and not (isinstance(metrics, list) and all(isinstance(m, str) for m in metrics)):
                raise errors.invalid_request("'metrics' must be a list of metric names.", "metrics")
            return _json({"reset": await self.usage.reset(app_id, user_id, metrics)})
        return _json(await self.usage.show(app_id, user_id))

    @_answers_with_errors
    async def cache_view(self, request: Request, app_id: str, purge: bool) -> Response:
        await self._admin(request)
        return _json(await (self.cache.purge(app_id) if purge else self.cache.stats(app_id)))

    @_answers_with_errors
    async def deployments(self, request: Request, name: str | None = None) -> Response:
        await self._admin(request)
        if name is None:
            return _json({"object": "list", "data": await self.catalogue.list(),
                          "health": self.catalogue.health()})
        if request.method == "GET":
            doc = await self.catalogue.get(name)
            if doc is None:
                raise errors.not_found("No such deployment in the catalogue.")
            return _json(doc)
        if request.method == "PUT":
            return _json(await self.catalogue.put(name, await self._json_body(request)))
        if request.method == "DELETE":
            if not await self.catalogue.delete(name):
                raise errors.not_found("No such deployment in the catalogue.")
            return Response(status_code=204)
        raise GatewayError(405, "method_not_allowed", f"{request.method} is not allowed here.")

    @_answers_with_errors
    async def pricing(self, request: Request, model: str | None = None) -> Response:
        await self._admin(request)
        if model is None:
            return _json({"object": "list", "data": await self.prices.list()})
        if request.method == "PUT":
            return _json(await self.prices.put(model, await self._json_body(request)))
        if request.method == "DELETE":
            if not await self.prices.delete(model):
                raise errors.not_found("No stored price for that model (built-in prices cannot be deleted).")
            return Response(status_code=204)
        raise GatewayError(405, "method_not_allowed", f"{request.method} is not allowed here.")

    @_answers_with_errors
    async def logs(self, request: Request, request_id: str | None = None) -> Response:
        await self._admin(request)
        if request_id is not None:
            record = await self._store.get_log(request_id)
            if record is None:
                raise errors.not_found("No log record with that request id.")
            return _json(record)
        query = _log_query(request.query_params)
        records = await self._store.query_logs(replace(query, limit=query.limit + 1))  # one more: is there a next page?
        page, more = records[:query.limit], len(records) > query.limit
        return _json({"object": "list", "data": page, "has_more": more, "next_cursor": log_cursor(page[-1]) if more else None})

    @_answers_with_errors
    async def export_logs(self, request: Request) -> Response:
        """Every record of a range (the log's filters), streamed as JSON lines or CSV: read a page
        at a time, so memory stays flat whatever the range."""
        await self._admin(request)
        params = request.query_params
        fmt = params.get("format", "jsonl")
        if fmt not in ("jsonl", "csv"):
            raise errors.invalid_request("format must be jsonl or csv.", "format")
        query = _log_query(params, paging=False)
        records = self._store.iter_logs(query)
        if fmt == "jsonl":
            lines = request_log.jsonl_lines(records)
            media, name = "application/x-ndjson", "sekisho-logs.jsonl"
        else:
            lines = request_log.csv_lines(records)
            media, name = "text/csv; charset=utf-8", "sekisho-logs.csv"
        return StreamingResponse(lines, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @_answers_with_errors
    async def alerts(self, request: Request) -> Response:
        """Budget alerts, newest first: of one app (`app_id`), of one delivery state (`status`:
        pending, delivered, dead_letter, off)."""
        await self._admin(request)
        params = request.query_params
        limit = page_limit(params, MAX_LOG_PAGE)
        status = params.get("status")
        if status is not None and status not in ALERT_DELIVERY_STATES:
            raise errors.invalid_request(f"status must be one of {', '.join(ALERT_DELIVERY_STATES)}.", "status")
        app_id = _filter_value(params["app_id"], "app_id") if "app_id" in params else None
        return _json({"object": "list", "data": await budget_alerts.listed(self._store, app_id, status, limit)})

    # Reports from the usage roll-ups ------------------------------------------------------------
    async def _report_rows(self, request: Request) -> tuple[list[dict[str, Any]], str]:
        params = request.query_params
        by = params.get("by", "app")
        if by not in rollups.GROUPS:
            raise errors.invalid_request(f"by must be one of {', '.join(rollups.GROUPS)}.", "by")
        rows = await self._rollups(params)
        if by in rollups.CHARGEBACK_GROUPS:
            rows = focus.with_chargeback(rows, await focus.chargeback_of(self._resolver, (r.get("app_id") for r in rows)))
        return rollups.group(rows, by), by

    @_answers_with_errors
    async def reports(self, request: Request, report: str) -> Response:
        await self._admin(request)
        metric = request.query_params.get("metric", "cost")
        if metric not in ("cost", "requests", "total_tokens", "errors", "cache_hits"):
            raise errors.invalid_request("metric must be cost, requests, total_tokens, errors or cache_hits.", "metric")
        if report == "focus":
            return Response(await self._focus(request), media_type="text/csv; charset=utf-8",
                            headers={"Content-Disposition": 'attachment; filename="sekisho-focus-1.2.csv"', "Cache-Control": "no-store"})
        rows, by = await self._report_rows(request)
        if report == "usage":
            if request.query_params.get("format", "json") not in ("json", "csv"):
                raise errors.invalid_request("format must be json or csv.", "format")
            if request.query_params.get("format") == "csv":
                return Response(rollups.to_csv(rows, by), media_type="text/csv; charset=utf-8",
                                headers={"Content-Disposition": f'attachment; filename="sekisho-usage-by-{by}.csv"'})
            return _json({"object": "list", "by": by, "currency": self._currency, "data": rows})
        if report == "chart":
            points = [(rollups.group_label(row, by), float(row[metric])) for row in rows[:60]]
            title = f"{metric.replace('_', ' ')} by {by}" + (f" ({self._currency})" if metric == "cost" else "")
            return Response(bar_chart(points, title), media_type="image/svg+xml", headers={"Cache-Control": "no-store"})
        raise errors.not_found(f"No report {report!r}: usage, chart or focus.")

    async def _rollups(self, params) -> list[dict[str, Any]]:
        """The roll-up documents of the app and days asked for (since/until: YYYY-MM-DD)."""
        if "app_id" in params:
            _filter_value(params["app_id"], "app_id")
        since, until = params.get("since"), params.get("until")
        for name, value in (("since", since), ("until", until)):
            if value is not None and not _is_day(value):  # an empty value too: say what was meant
                raise errors.invalid_request(f"{name} must be a day, YYYY-MM-DD.", name)
        return await self._store.query_rollups(params.get("app_id") or None, since, until)

    async def _focus(self, request: Request) -> str:
        """The FOCUS 1.2 cost export (records/focus.py) of the days asked for."""
        rows = await self._rollups(request.query_params)
        apps = await focus.chargeback_of(self._resolver, (r.get("app_id") for r in rows))
        return focus.to_csv(focus.focus_rows(rows, apps, zone=self._zone, currency=self._currency, billing_account_id=self._billing_account))

    # The admin page ---------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        """The page (admins only). Without any credentials: how to sign in, as a 401 page."""
        signed_in = any(h in request.headers for h in ("authorization", "x-ms-client-principal")) or admin_sessions.COOKIE in request.cookies
        if not signed_in:
            return HTMLResponse(_SIGN_IN_PAGE, status_code=401)
        try:
            await self._admin(request)
        except GatewayError as exc:
            return HTMLResponse(_message_page(exc.message), status_code=exc.status)
        return HTMLResponse(_PAGE.read_text(encoding="utf-8"), headers=_PAGE_HEADERS)

    async def login(self, request: Request) -> Response:
        """Redeem a one-time login code (from `python -m shared.admin.cli admin-login`) for a session."""
        code = request.query_params.get("code", "")
        session = await admin_sessions.redeem_login_code(self._store, code) if code else None
        if session is None:
            return HTMLResponse(_message_page("This login link is invalid, used or expired. Run `python -m shared.admin.cli admin-login` for a new one."), status_code=401)
        secure = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
        return Response(status_code=303, headers={"Location": admin_sessions.COOKIE_PATH, "Set-Cookie": admin_sessions.cookie_header(session, secure),
                                                  "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


def _log_query(params, paging: bool = True) -> LogQuery:
    """The request log's filters from a query string (the list and the export share them)."""
    status = params.get("status")
    # isascii(): str.isdigit() also accepts '²' or '١', which int() refuses.
    if status is not None and not (status.isascii() and status.isdigit() and len(status) <= 3):
        raise errors.invalid_request("status must be an HTTP status code.", "status")
    cache, guard = params.get("cache"), params.get("guard")
    if cache is not None and cache not in ("HIT", "MISS", "BYPASS"):
        raise errors.invalid_request("cache must be HIT, MISS or BYPASS.", "cache")
    if guard is not None and guard not in ("true", "false"):
        raise errors.invalid_request("guard must be true or false.", "guard")
    for name in ("app_id", "user_id", "deployment"):
        if name in params:
            _filter_value(params[name], name)
    after = None
    if paging and "cursor" in params:
        try:
            after = read_log_cursor(params["cursor"])
        except ValueError:
            raise errors.invalid_request("cursor is not one this API returned (next_cursor).", "cursor") from None
    times = {}
    for name in ("since", "until"):
        if name in params:
            try:
                times[name] = _utc(params[name])
            except (ValueError, OverflowError):  # an empty value too; overflow: year 1 moved to UTC
                raise errors.invalid_request(f"{name} must be an ISO 8601 time, e.g. 2026-11-30T00:00:00Z.", name) from None
    return LogQuery(
        app_id=params.get("app_id") or None, user_id=params.get("user_id") or None, deployment=params.get("deployment") or None,
        status=int(status) if status else None, since=times.get("since"), until=times.get("until"),
        cache=cache, guard=None if guard is None else guard == "true", limit=page_limit(params, MAX_LOG_PAGE) if paging else MAX_LOG_PAGE, after=after,
    )


def _filter_value(value: str, name: str) -> str:
    """A filter that is present says what it filters by: empty is a mistake, not "any"."""
    if not value:
        raise errors.invalid_request(f"{name} is empty: give a value, or leave the parameter out.", name)
    if name in ("app_id", "user_id"):
        check_id(value, name.replace("_", " "))
    return value


def _utc(value: str) -> str:
    """A time as the log writes it (UTC, milliseconds, Z), so that string order is time order;
    ValueError or OverflowError when it is not a time."""
    from datetime import datetime, timezone

    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_day(value: str) -> bool:
    import re
    from datetime import date

    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) is None:
        return False
    try:
        date.fromisoformat(value)  # a real day: not 2026-13-01
    except ValueError:
        return False
    return True


_PAGE = Path(__file__).parent / "ui" / "index.html"
# The page loads nothing from elsewhere and runs only its own script.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
}
_SIGN_IN_PAGE = """<!doctype html><meta charset="utf-8"><title>Sekisho admin: sign in</title>
<body style="font-family:system-ui,sans-serif;max-width:40em;margin:3em auto">
<h1>Sekisho admin</h1><p>Sign in first.</p>
<ul><li>In Azure: <a href="/.auth/login/aad?post_login_redirect_uri=/sekisho/admin">sign in with Microsoft Entra ID</a>
(App Service Authentication; your account needs the gateway's admin app role).</li>
<li>Locally: run <code>python -m shared.admin.cli admin-login</code> and open the link it prints.</li></ul></body>"""


def _message_page(message: str) -> str:
    from html import escape

    return f'<!doctype html><meta charset="utf-8"><title>Sekisho admin</title><body style="font-family:system-ui,sans-serif;max-width:40em;margin:3em auto"><h1>Sekisho admin</h1><p>{escape(message)}</p></body>'


__all__ = ["AdminApi", "PolicyService", "forbidden"]
