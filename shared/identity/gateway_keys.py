"""Gateway keys: api-keys for the tools that can only be given an endpoint and a key.

Entra ID tokens stay the way apps sign in; a key is for a tool (a chat front end, a workflow
tool, an IDE plugin, `AzureOpenAI(api_key=…)` code) that cannot get one. A key belongs to one
app, whose policy must allow keys (`gateway_keys.enabled`), and may be narrower than the app:
fewer deployments, one fixed end user, an expiry.

    sekisho-gk-<key id: 12 hex>-<secret: 256 bits, base64url>

The prefix lets secret scanners find a leaked key; the key id is its public part (logs and
refusals name it, nothing else). The store keeps only an HMAC-SHA256 of the whole key under a
pepper from the settings (a Key Vault secret in Azure), so a copy of the store is no key; a
presented key is checked in constant time. Keys read from the store are reused in memory for
the policy cache time, which bounds how long a revoked key keeps working on an instance.

Failures are counted per client address: from the `FAILURE_LIMIT`th failure in a minute, that
client's failed attempts are answered 429 with Retry-After until the minute ends, and its key
lookups in the store are limited to one a second. A valid key is still accepted from that address
(at once when this instance has it in memory, else within a second), so one attacker cannot lock
an app out; a key's secret (256 bits) is not guessable at any rate.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ..errors import GatewayError
from ..store import Store, StoreError

logger = logging.getLogger("sekisho.gateway_keys")

PREFIX = "sekisho-gk-"
_KEY = re.compile(r"^sekisho-gk-([0-9a-f]{12})-([A-Za-z0-9_-]{43})$")
FAILURE_LIMIT = 20  # failed key attempts per client address per minute before it is refused for the minute
_LAST_USED_EVERY = 60.0  # seconds between writes of a key's last use, per instance
_MAX_TRACKED = 50_000


def looks_like_key(value: str) -> bool:
    return value.startswith(PREFIX)


def key_id_of(value: str) -> str | None:
    match = _KEY.match(value)
    return match.group(1) if match else None


def invalid_api_key(message: str) -> GatewayError:
    return GatewayError(401, "invalid_api_key", message, error_type="invalid_request_error")


def digest(pepper: bytes, key: str) -> str:
    return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()


def new_key() -> tuple[str, str]:
    """(key id, whole key)."""
    key_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return key_id, f"{PREFIX}{key_id}-{secret}"


@dataclass(frozen=True)
class KeyGrant:
    """What a verified key allows."""

    key_id: str
    app_id: str
    deployments: tuple[str, ...] | None  # narrower than the app's, when set
    user: str | None  # a fixed end user, when set


class KeyVerifier:
    def __init__(self, store: Store, pepper: bytes, cache_seconds: float) -> None:
        self._store = store
        self._pepper = pepper
        self._cache_seconds = cache_seconds
        self._docs: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._failures: dict[str, tuple[int, int]] = {}  # client → (minute, failures in it)
        self._last_written: dict[str, float] = {}
        self._last_lookup: dict[str, float] = {}  # refused clients: their last store lookup
        self._writes: set[asyncio.Task] = set()

    async def verify(self, key: str, client: str) -> KeyGrant:
        key_id = key_id_of(key)
        refused = self._refused(client)
        now = time.time()
        cached = self._docs.get(key_id) if key_id else None
        if cached is not None and now - cached[0] < self._cache_seconds:
            doc = cached[1]
        elif key_id is None or (refused is not None and not self._lookup_allowed(client, now)):
            doc = None  # malformed, or a client over its failure limit that just had its lookup: no store read
        else:
            try:
                doc = await self._store.get_gateway_key(key_id)
            except StoreError:
                raise GatewayError(503, "auth_unavailable", "Gateway keys cannot be checked right now; try again shortly.",
                                   error_type="server_error") from None
            if len(self._docs) > _MAX_TRACKED:
                self._docs.clear()
            self._docs[key_id] = (now, doc)
        problem = self._problem(doc, key, now)
        if problem is None:
            self._touch(doc, now)
            return KeyGrant(doc["id"], doc["app_id"], tuple(doc["deployments"]) if doc.get("deployments") else None, doc.get("user"))
        self._count_failure(client)
        wait = refused if refused is not None else self._refused(client)
        if wait is not None:
            raise GatewayError(429, "rate_limit_exceeded", f"Too many failed gateway keys from this client; retry after {wait} seconds.",
                               error_type="rate_limit_error", headers={"Retry-After": str(wait)})
        shown = f"{PREFIX}{key_id}-…" if key_id else "a value that is not a gateway key"
        raise invalid_api_key(f"Incorrect API key provided: {shown} {problem}.")

    def _problem(self, doc: dict[str, Any] | None, key: str, now: float) -> str | None:
        if doc is None:
            # Compare anyway, so that an unknown id costs what a wrong secret costs.
            hmac.compare_digest(digest(self._pepper, key), "0" * 64)
            return "is not known"
        if not hmac.compare_digest(digest(self._pepper, key), doc.get("hash", "")):
            return "is not known"
        if doc.get("revoked_at"):
            return "was revoked"
        if doc.get("expires_at") and doc["expires_at"] <= now:
            return "has expired"
        return None

    def _lookup_allowed(self, client: str, now: float) -> bool:
        """A client over its failure limit still gets one store lookup a second: its valid keys keep
        working (after at most a second), its guesses cost the store almost nothing."""
        if now - self._last_lookup.get(client, 0.0) < 1.0:
            return False
        if len(self._last_lookup) > _MAX_TRACKED:
            self._last_lookup.clear()
        self._last_lookup[client] = now
        return True

    def _refused(self, client: str) -> int | None:
        """Seconds until the client may fail again, when it is over its limit."""
        minute, failures = self._failures.get(client, (0, 0))
        now = time.time()
        if minute == int(now // 60) and failures >= FAILURE_LIMIT:
            return max(1, math.ceil(60 - now % 60))
        return None

    def _count_failure(self, client: str) -> None:
        current = int(time.time() // 60)
        minute, failures = self._failures.get(client, (current, 0))
        if len(self._failures) > _MAX_TRACKED:
            self._failures.clear()
        self._failures[client] = (current, failures + 1 if minute == current else 1)

    def forget(self, key_id: str) -> None:
        """This instance stops trusting its copy at once (a revoke or rotate through it)."""
        self._docs.pop(key_id, None)

    def _touch(self, doc: dict[str, Any], now: float) -> None:
        """Last use, for the admin's list: written at most once a minute per key and instance."""
        if now - self._last_written.get(doc["id"], 0.0) < _LAST_USED_EVERY:
            return
        self._last_written[doc["id"]] = now

        async def write() -> None:
            try:
                fresh = await self._store.get_gateway_key(doc["id"])
                if fresh is not None:
                    await self._store.put_gateway_key({**fresh, "last_used_at": int(now)})
            except Exception:
                logger.warning("last use of gateway key %s not recorded", doc["id"])

        task = asyncio.get_running_loop().create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)


class KeyService:
    """Create, list, rotate and revoke an app's keys (admin API and CLI)."""

    def __init__(self, store: Store, pepper: bytes, verifier: KeyVerifier | None = None) -> None:
        self._store = store
        self._pepper = pepper
        self._verifier = verifier

    async def create(self, app_id: str, name: str, *, expires_in_days: float | None = None, deployments: list[str] | None = None,
                     user: str | None = None, actor: str | None = None, rotated_from: str | None = None) -> tuple[dict[str, Any], str]:
        key_id, key = new_key()
        now = int(time.time())
        doc = {"id": key_id, "app_id": app_id, "name": name, "hash": digest(self._pepper, key), "created_at": now,
               "created_by": actor, "expires_at": now + int(expires_in_days * 86400) if expires_in_days else None,
               "revoked_at": None, "deployments": sorted(set(deployments)) if deployments else None, "user": user,
               "rotated_from": rotated_from, "last_used_at": None}
        await self._store.put_gateway_key(doc)
        return public(doc), key

    async def list(self, app_id: str) -> list[dict[str, Any]]:
        return [public(doc) for doc in sorted(await self._store.list_gateway_keys(app_id), key=lambda d: d["created_at"])]

    async def _own(self, app_id: str, key_id: str) -> dict[str, Any]:
        doc = await self._store.get_gateway_key(key_id)
        if doc is None or doc.get("app_id") != app_id:
            raise GatewayError(404, "not_found", f"No gateway key {key_id!r} for application {app_id}.")
        return doc

    async def revoke(self, app_id: str, key_id: str, actor: str | None = None) -> dict[str, Any]:
        doc = await self._own(app_id, key_id)
        doc = {**doc, "revoked_at": int(time.time()), "revoked_by": actor}
        await self._store.put_gateway_key(doc)
        if self._verifier is not None:
            self._verifier.forget(key_id)
        return public(doc)

    async def rotate(self, app_id: str, key_id: str, overlap_seconds: int, actor: str | None = None) -> tuple[dict[str, Any], str]:
        """A new key with the old one's name and limits; the old one keeps working for the overlap."""
        old = await self._own(app_id, key_id)
        if old.get("revoked_at"):
            raise GatewayError(409, "conflict", f"Gateway key {key_id} is revoked; create a new one.")
        remaining = (old["expires_at"] - time.time()) / 86400 if old.get("expires_at") else None
        created, key = await self.create(app_id, old["name"], expires_in_days=remaining, deployments=old.get("deployments"),
                                         user=old.get("user"), actor=actor, rotated_from=key_id)
        ends = int(time.time()) + overlap_seconds
        if not old.get("expires_at") or old["expires_at"] > ends:
            await self._store.put_gateway_key({**old, "expires_at": ends, "rotated_to": created["id"]})
        if self._verifier is not None:
            self._verifier.forget(key_id)
        return created, key


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """A key as admins see it: everything but its hash."""
    return {k: v for k, v in doc.items() if k != "hash"}
