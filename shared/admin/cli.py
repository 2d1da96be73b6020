"""Sekisho's command line: apps, policies, request logs, and local tokens.

    python -m shared.admin.cli apps create <app-id> --name "HR bot" --deployments gpt-4o-mini
    python -m shared.admin.cli apps list
    python -m shared.admin.cli policies get app <app-id>
    python -m shared.admin.cli policies set user <app-id> <user-id> --json '{"settings": {"enabled": false}}'
    python -m shared.admin.cli policies delete defaults
    python -m shared.admin.cli logs list --app-id <app-id> --limit 20
    python -m shared.admin.cli usage show <app-id> [--user <user-id>]
    python -m shared.admin.cli usage reset <app-id> [--user <user-id>] [--metric tokens_per_day]
    python -m shared.admin.cli cache stats <app-id>
    python -m shared.admin.cli cache purge <app-id>
    python -m shared.admin.cli pricing list
    python -m shared.admin.cli pricing set <model> --input 0.15 --output 0.60 [--cached-input 0.075]
    python -m shared.admin.cli report --by app|user|deployment|model|operation|day|cost_centre|owner [--app-id X] [--since D] [--until D] [--csv FILE|-]
    python -m shared.admin.cli report --focus FILE|- [--app-id X] [--since D] [--until D]    (FinOps FOCUS 1.2 cost export)
    python -m shared.admin.cli admin-login [--url http://127.0.0.1:7071]
    python -m shared.admin.cli keys create|list|revoke|rotate <app-id> [<key-id>] [--name …]
    python -m shared.admin.cli token mint --app-id <app-id> [--user <oid>] [--role Sekisho.Admin] [--v1]
    python -m shared.admin.cli issuer rotate

It reads the same settings as the gateway (SEKISHO_STORE, SEKISHO_SQLITE_PATH, SEKISHO_COSMOS_*)
and writes through the same PolicyService as the admin API, so input is validated the same way.
Token commands use the local issuer in --data-dir (local mode only; in Azure, Entra issues tokens).
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from typing import Any

from ..errors import GatewayError
from ..policy.policies import PolicyError
from ..quota import alerts
from ..records import request_log
from ..store.base import MAX_LOG_PAGE, log_cursor, read_log_cursor
from ..quota.alerts import ALERT_DELIVERY_STATES
from ..records.rollups import GROUPS
from ..settings import Settings, SettingsError
from ..store import AlreadyExists, LogQuery, PreconditionFailed, open_store
from .api import PolicyService


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _print_table(rows: list[dict[str, Any]], by: str, currency: str) -> None:
    keys = {"app": ("app_id",), "user": ("app_id", "user_id")}.get(by, (by,))
    header = (*keys, "requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", f"cost ({currency})")
    lines = [header] + [(*(str(r[k]) for k in keys), str(r["requests"]), str(r["errors"]), str(r["prompt_tokens"]),
                         str(r["completion_tokens"]), str(r["total_tokens"]), f"{r['cost']:.6f}") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) if i < len(keys) else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))


def _layer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=("defaults", "app", "user"))
    parser.add_argument("app_id", nargs="?")
    parser.add_argument("user_id", nargs="?")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shared.admin.cli", description="Manage Sekisho apps, policies, logs and local tokens.")
    parser.add_argument("--data-dir", default=".data", help="local data folder (SQLite default path, local issuer)")
    groups = parser.add_subparsers(dest="group", required=True)

    apps = groups.add_parser("apps", help="register and list apps").add_subparsers(dest="command", required=True)
    create = apps.add_parser("create", help="register an app (its Entra client id)")
    create.add_argument("app_id")
    create.add_argument("--name", required=True)
    create.add_argument("--deployments", default="*", help="comma-separated deployment names, or * (default)")
    create.add_argument("--trust-user-header", action="store_true", help="let the app name its end users (x-sekisho-user)")
    create.add_argument("--content-logging", choices=("full", "redacted", "metadata"))
    create.add_argument("--retention-days", type=int)
    create.add_argument("--disabled", action="store_true")
    apps.add_parser("list", help="list registered apps")

    policies = groups.add_parser("policies", help="read and change policy layers").add_subparsers(dest="command", required=True)
    _layer_args(policies.add_parser("get"))
    put = policies.add_parser("set", help="create or replace a layer")
    _layer_args(put)
    put.add_argument("--json", required=True, help='the layer, e.g. {"name": "x", "settings": {"enabled": true}}')
    put.add_argument("--if-match", help="only replace this version (ETag)")
    delete = policies.add_parser("delete")
    _layer_args(delete)
    delete.add_argument("--if-match")
    policies.add_parser("list").add_argument("--app-id")

    logs = groups.add_parser("logs", help="read the request log").add_subparsers(dest="command", required=True)
    listing = logs.add_parser("list")
    for name in ("app-id", "user-id", "deployment", "since", "until"):
        listing.add_argument(f"--{name}")
    listing.add_argument("--status", type=int)
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--cursor", help="the next_cursor a previous page printed on stderr")
    logs.add_parser("get").add_argument("request_id")
    export = logs.add_parser("export", help="every record of a range, streamed to a file (JSON lines or CSV)")
    for name in ("app-id", "user-id", "deployment", "since", "until"):
        export.add_argument(f"--{name}")
    export.add_argument("--status", type=int)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--output", "-o", required=True, help="file to write ('-' for stdout)")

    alerts = groups.add_parser("alerts", help="budget alerts raised (one per threshold crossed per window)").add_subparsers(dest="command", required=True)
    alert_list = alerts.add_parser("list")
    alert_list.add_argument("--app-id")
    alert_list.add_argument("--status", choices=ALERT_DELIVERY_STATES, help="webhook delivery state (dead_letter: never accepted)")
    alert_list.add_argument("--limit", type=int, default=20)

    usage = groups.add_parser("usage", help="quota use against limits").add_subparsers(dest="command", required=True)
    for name in ("show", "reset"):
        command = usage.add_parser(name)
        command.add_argument("app_id")
        command.add_argument("--user")
        if name == "reset":
            command.add_argument("--metric", action="append", help="requests_per_minute, tokens_per_minute, tokens_per_day, spend_per_month (default: all)")

    cache = groups.add_parser("cache", help="the response cache").add_subparsers(dest="command", required=True)
    cache.add_parser("stats").add_argument("app_id")
    cache.add_parser("purge").add_argument("app_id")

    pricing = groups.add_parser("pricing", help="prices per model").add_subparsers(dest="command", required=True)
    pricing.add_parser("list")
    price = pricing.add_parser("set")
    price.add_argument("model")
    price.add_argument("--input", type=float, required=True, help="per 1M input tokens")
    price.add_argument("--cached-input", type=float)
    price.add_argument("--output", type=float, default=0.0, help="per 1M output tokens")
    pricing.add_parser("delete").add_argument("model")

    keys = groups.add_parser("keys", help="gateway keys, for tools that can only send an api-key").add_subparsers(dest="command", required=True)
    key_create = keys.add_parser("create", help="a new key, printed once")
    key_create.add_argument("app_id")
    key_create.add_argument("--name", required=True)
    key_create.add_argument("--expires-in-days", type=float)
    key_create.add_argument("--deployments", help="comma-separated: narrower than the app's")
    key_create.add_argument("--user", help="a fixed end user for every call with this key")
    keys.add_parser("list").add_argument("app_id")
    for name in ("revoke", "rotate"):
        command = keys.add_parser(name)
        command.add_argument("app_id")
        command.add_argument("key_id")
        if name == "rotate":
            command.add_argument("--overlap-seconds", type=int, default=86400, help="how long the old key keeps working")

    token = groups.add_parser("token", help="local tokens").add_subparsers(dest="command", required=True)
    mint = token.add_parser("mint", help="mint a token from the local issuer, shaped like Entra's")
    mint.add_argument("--app-id", required=True)
    mint.add_argument("--user", help="object id of a signed-in user (delegated token); omit for app-only")
    mint.add_argument("--role", action="append", default=[], help="app role, e.g. Sekisho.Admin (repeatable)")
    mint.add_argument("--v1", action="store_true", help="a v1.0 token (sts.windows.net issuer, appid claim)")
    mint.add_argument("--minutes", type=int, default=60)
    report = groups.add_parser("report", help="usage and cost from the roll-ups (chargeback)")
    report.add_argument("--by", choices=GROUPS, default="app")
    report.add_argument("--app-id")
    report.add_argument("--since", help="first day, YYYY-MM-DD (quota time zone)")
    report.add_argument("--until", help="last day, YYYY-MM-DD, inclusive")
    report.add_argument("--csv", metavar="FILE", help="write CSV to FILE (- for standard output) instead of a table")
    report.add_argument("--focus", metavar="FILE", help="write the FOCUS 1.2 cost export to FILE (- for standard output) instead")

    login = groups.add_parser("admin-login", help="a one-time link that signs a browser in to the admin page (local mode)")
    login.add_argument("--url", default="http://127.0.0.1:7071", help="the gateway's base URL (the local host's, by default)")

    groups.add_parser("issuer", help="the local issuer").add_subparsers(dest="command", required=True).add_parser("rotate")
    return parser


async def _with_service(args, action):
    env = dict(os.environ)
    env.setdefault("SEKISHO_SQLITE_PATH", os.path.join(args.data_dir, "sekisho.db"))
    settings = Settings.from_env(env, serving=False)
    store = await open_store(settings)
    try:
        return await action(PolicyService(store), store, settings)
    finally:
        await store.close()


def _write(target: str, text: str) -> None:
    if target == "-":
        sys.stdout.write(text)
    else:
        with open(target, "w", encoding="utf-8", newline="") as out:
            out.write(text)


def _usage_service(store, settings):
    from ..policy.access import PolicyCache, PolicyResolver
    from ..policy.policies import builtin_defaults
    from ..quota.enforce import Windows
    from .api import UsageService

    resolver = PolicyResolver(PolicyCache(store, 0), builtin_defaults(settings.log_content, settings.log_retention_days), True)
    return UsageService(store, resolver, Windows(settings.quota_timezone), settings.currency)


def _pricing_service(store, settings):
    from ..quota.pricing import PricingTable
    from .api import PricingService

    return PricingService(store, PricingTable(store, 0))


async def run(args) -> int:
    actor = "cli:" + getpass.getuser()
    if args.group in ("token", "issuer"):
        # Local mode only: the local issuer is not part of the deployed package.
        from ..local.issuer import LocalIssuer
    if args.group == "token":
        issuer = LocalIssuer(args.data_dir)
        print(issuer.mint(args.app_id, user_oid=args.user, roles=args.role, version="1.0" if args.v1 else "2.0", lifetime_seconds=args.minutes * 60))
        return 0
    if args.group == "issuer":
        print(LocalIssuer(args.data_dir).rotate())
        return 0

    async def action(service: PolicyService, store, settings):
        if args.group == "apps" and args.command == "create":
            settings: dict[str, Any] = {
                "enabled": not args.disabled,
                "allowed_deployments": [d for d in args.deployments.split(",") if d],
                "trust_user_header": args.trust_user_header,
            }
            if args.content_logging:
                settings["content_logging"] = args.content_logging
            if args.retention_days:
                settings["retention_days"] = args.retention_days
            doc, _ = await service.put("app", args.app_id, None, {"name": args.name, "settings": settings}, actor=actor, create_only=True)
            _print(doc)
        elif args.group == "apps":
            _print([d for d in await service.list() if d["kind"] == "app"])
        elif args.group == "policies" and args.command == "list":
            _print(await service.list(args.app_id))
        elif args.group == "policies" and args.command == "get":
            doc = await service.get(args.kind, args.app_id, args.user_id)
            if doc is None:
                raise LookupError("no such policy")
            _print(doc)
        elif args.group == "policies" and args.command == "set":
            doc, created = await service.put(args.kind, args.app_id, args.user_id, json.loads(args.json), actor=actor, if_match=args.if_match)
            _print(doc)
        elif args.group == "policies" and args.command == "delete":
            if not await service.delete(args.kind, args.app_id, args.user_id, actor=actor, if_match=args.if_match):
                raise LookupError("no such policy")
        elif args.group == "usage" and args.command == "show":
            _print(await _usage_service(store, settings).show(args.app_id, args.user))
        elif args.group == "usage":
            _print({"reset": await _usage_service(store, settings).reset(args.app_id, args.user, args.metric)})
        elif args.group == "cache":
            from ..cache.responses import CacheResponses
            from ..quota.enforce import Windows
            from ..quota.pricing import PricingTable
            from .api import CacheService

            cache = CacheResponses(store, PricingTable(store, 0), Windows(settings.quota_timezone), settings.cache_max_entry_bytes, settings.currency)
            service = CacheService(store, _usage_service(store, settings)._resolver, cache)
            _print(await (service.stats(args.app_id) if args.command == "stats" else service.purge(args.app_id)))
        elif args.group == "pricing" and args.command == "list":
            _print(await _pricing_service(store, settings).list())
        elif args.group == "pricing" and args.command == "set":
            data = {"input_per_1m": args.input, "cached_input_per_1m": args.cached_input, "output_per_1m": args.output}
            _print(await _pricing_service(store, settings).put(args.model, data))
        elif args.group == "pricing":
            if not await _pricing_service(store, settings).delete(args.model):
                raise LookupError("no stored price for that model")
        elif args.group == "report":
            from ..gateway import billing_account_id
            from ..records import focus
            from ..records.rollups import CHARGEBACK_GROUPS, group, to_csv

            raw = await store.query_rollups(args.app_id, args.since, args.until)
            resolver = _usage_service(store, settings)._resolver
            if args.focus:
                apps = await focus.chargeback_of(resolver, (r.get("app_id") for r in raw))
                _write(args.focus, focus.to_csv(focus.focus_rows(raw, apps, zone=settings.quota_timezone, currency=settings.currency,
                                                                 billing_account_id=billing_account_id(settings))))
                return
            if args.by in CHARGEBACK_GROUPS:
                raw = focus.with_chargeback(raw, await focus.chargeback_of(resolver, (r.get("app_id") for r in raw)))
            rows = group(raw, args.by)
            if args.csv:
                _write(args.csv, to_csv(rows, args.by))
            else:
                _print_table(rows, args.by, settings.currency)
        elif args.group == "admin-login":
            from .sessions import LOGIN_CODE_SECONDS, create_login_code

            code = await create_login_code(store, actor)
            print(f"{args.url.rstrip('/')}/sekisho/admin/login?code={code}")
            print(f"(works once, for {LOGIN_CODE_SECONDS // 60} minutes)", file=sys.stderr)
        elif args.group == "keys":
            from ..identity.gateway_keys import KeyService

            pepper = settings.gateway_key_pepper or _local_pepper(args.data_dir)
            if not pepper:
                raise LookupError("gateway keys need SEKISHO_GATEWAY_KEY_PEPPER (the same value the gateway has)")
            service = KeyService(store, pepper.encode())
            if args.command == "create":
                deployments = [d for d in (args.deployments or "").split(",") if d] or None
                doc, key = await service.create(args.app_id, args.name, expires_in_days=args.expires_in_days, deployments=deployments,
                                                user=args.user, actor=actor)
                _print({**doc, "key": key})
                print("The key is shown this once: store it in the tool now.", file=sys.stderr)
            elif args.command == "list":
                _print(await service.list(args.app_id))
            elif args.command == "revoke":
                _print(await service.revoke(args.app_id, args.key_id, actor=actor))
            else:
                doc, key = await service.rotate(args.app_id, args.key_id, args.overlap_seconds, actor=actor)
                _print({**doc, "key": key})
        elif args.group == "alerts":
            _print(await alerts.listed(store, args.app_id, args.status, args.limit))
        elif args.group == "logs" and args.command == "get":
            record = await store.get_log(args.request_id)
            if record is None:
                raise LookupError("no such request")
            _print(record)
        elif args.group == "logs" and args.command == "export":
            query = LogQuery(app_id=args.app_id, user_id=args.user_id, deployment=args.deployment, status=args.status,
                             since=args.since, until=args.until)
            records = store.iter_logs(query)
            lines = request_log.csv_lines(records) if args.format == "csv" else request_log.jsonl_lines(records)
            out = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")
            count = -1 if args.format == "csv" else 0  # the CSV's header line
            try:
                async for line in lines:
                    out.write(line)
                    count += 1
            finally:
                if out is not sys.stdout.buffer:
                    out.close()
            print(f"{count} record(s) written", file=sys.stderr)
        elif args.group == "logs":
            limit = max(1, min(args.limit, MAX_LOG_PAGE))
            query = LogQuery(app_id=args.app_id, user_id=args.user_id, deployment=args.deployment, status=args.status,
                             since=args.since, until=args.until, limit=limit + 1,
                             after=read_log_cursor(args.cursor) if args.cursor else None)
            records = await store.query_logs(query)
            _print(records[:limit])
            if len(records) > limit:
                print(f"next page: --cursor {log_cursor(records[limit - 1])}", file=sys.stderr)

    await _with_service(args, action)
    return 0


def _local_pepper(data_dir: str) -> str | None:
    """The pepper the local host keeps in its data folder (local mode)."""
    path = os.path.join(data_dir, "gateway-key-pepper")
    return open(path, encoding="utf-8").read().strip() if os.path.exists(path) else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (PolicyError, SettingsError, LookupError, AlreadyExists, PreconditionFailed, json.JSONDecodeError, GatewayError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
