"""The access stage: the calling app's policy, its end user, and whether it may use the deployment.

Policies are read through `PolicyCache` (in memory, short TTL), so the hot path reads the store
only when an entry has expired. A change made through this instance's admin API is seen at once
here; other instances see it within the TTL.
"""
from __future__ import annotations

import time
from typing import Any

from ..context import RequestContext
from .. import errors
from ..errors import GatewayError
from ..pipeline import Stage
from ..identity.gateway_keys import PREFIX, invalid_api_key
from ..store import Store
from .policies import (
    APP_DOC_ID, DEFAULTS_ID, DEFAULTS_PARTITION, EffectivePolicy, PolicyDocument, PolicySettings, document_from_store, effective_policy, merge,
    user_doc_id,
)

USER_HEADER = "x-sekisho-user"
_MAX_USER_ID = 128
_MAX_CACHED = 20_000


def forbidden(message: str) -> GatewayError:
    return GatewayError(403, "forbidden", message, error_type="permission_error")


class PolicyCache:
    def __init__(self, store: Store, ttl_seconds: float) -> None:
        self._store = store
        self._ttl = ttl_seconds
        self._entries: dict[tuple[str, str], tuple[float, PolicyDocument | None]] = {}
        # Bumped by every invalidation: a read that was in flight across one must not cache what
        # it read (it may be the version the admin just replaced).
        self._generation = 0

    async def get(self, app_id: str, doc_id: str) -> PolicyDocument | None:
        key = (app_id, doc_id)
        entry = self._entries.get(key)
        now = time.monotonic()
        if entry is not None and entry[0] > now:
            return entry[1]
        generation = self._generation
        doc = document_from_store(await self._store.get_policy(app_id, doc_id))
        if generation == self._generation:
            if len(self._entries) >= _MAX_CACHED:
                self._entries.clear()  # crude but bounded; the store is the truth
            self._entries[key] = (now + self._ttl, doc)
        return doc

    def invalidate(self, app_id: str | None = None) -> None:
        self._generation += 1
        if app_id is None:
            self._entries.clear()
        else:
            for key in [k for k in self._entries if k[0] in (app_id, DEFAULTS_PARTITION)]:
                del self._entries[key]


class PolicyResolver:
    """defaults ← app ← user, for one app and (optionally) one user."""

    def __init__(self, cache: PolicyCache, builtin: PolicySettings, allow_unregistered: bool) -> None:
        self.cache = cache
        self._builtin = builtin
        self._allow_unregistered = allow_unregistered
        # Merging and validating layers costs more than a request should: keep the result while
        # the cache hands out the very same documents.
        self._merged: dict[tuple[str, str | None], tuple[object, object, object, EffectivePolicy]] = {}
        self._app_merged: dict[tuple[int, int], tuple[object, object, dict[str, Any]]] = {}

    async def app_layers(self, app_id: str) -> tuple[PolicyDocument | None, PolicyDocument | None]:
        defaults = await self.cache.get(DEFAULTS_PARTITION, DEFAULTS_ID)
        app = await self.cache.get(app_id, APP_DOC_ID)
        if app is None and not self._allow_unregistered:
            raise forbidden(f"The application {app_id} is not registered with this gateway.")
        return defaults, app

    def app_settings(self, defaults: PolicyDocument | None, app: PolicyDocument | None) -> dict[str, Any]:
        # Merging costs a pydantic dump per layer: keep it while the cache hands out the same documents.
        key = (id(defaults), id(app))
        known = self._app_merged.get(key)
        if known is not None and known[0] is defaults and known[1] is app:
            return known[2]
        merged = merge(self._builtin, defaults.settings if defaults else None, app.settings if app else None)
        if len(self._app_merged) >= _MAX_CACHED:
            self._app_merged.clear()
        self._app_merged[key] = (defaults, app, merged)
        return merged

    async def resolve(self, app_id: str, user_id: str | None) -> EffectivePolicy:
        defaults, app = await self.app_layers(app_id)
        user = await self.cache.get(app_id, user_doc_id(user_id)) if user_id else None
        key = (app_id, user_id)
        known = self._merged.get(key)
        if known is not None and known[0] is defaults and known[1] is app and known[2] is user:
            return known[3]
        policy = effective_policy(app_id, self._builtin, defaults, app, user)
        if len(self._merged) >= _MAX_CACHED:
            self._merged.clear()
        self._merged[key] = (defaults, app, user, policy)
        return policy


def _claimed_user(ctx: RequestContext) -> str | None:
    """The end user the request names (the header wins over the body's `user`), whoever is then
    trusted to name one. A name longer than a user id may be is refused, never cut: two users whose
    names share their first 128 characters would otherwise share one user's limits and log."""
    header = ctx.http.headers.get(USER_HEADER)
    body_user = ctx.body.get("user") if isinstance(ctx.body, dict) else None
    for value, param in ((header, USER_HEADER), (body_user, "user")):
        if isinstance(value, str) and len(value.strip()) > _MAX_USER_ID:
            raise errors.invalid_request(f"'{param}' is longer than {_MAX_USER_ID} characters.", param)
    if header:
        return header.strip() or None
    if isinstance(body_user, str) and body_user.strip():
        return body_user.strip()
    return None


class ApplyPolicy(Stage):
    name = "access"

    def __init__(self, resolver: PolicyResolver) -> None:
        self._resolver = resolver

    def record(self, ctx: RequestContext) -> dict[str, Any]:
        return {"claimed_user_ignored": True} if ctx.claimed_user_ignored else {}

    async def before(self, ctx: RequestContext) -> None:
        identity = ctx.identity
        claimed = _claimed_user(ctx)  # checked whatever the identity, used only for app-only tokens
        defaults, app = await self._resolver.app_layers(identity.app_id)
        app_level = self._resolver.app_settings(defaults, app)
        ctx.app_name = app.name if app else None
        key = identity.key
        if key is not None and key.user:
            user_id = key.user  # a key for one end user
        elif identity.delegated:
            user_id = identity.user_oid
        elif claimed and app_level["trust_user_header"]:
            user_id = claimed
        else:
            if claimed:
                ctx.claimed_user_ignored = True  # the app is not trusted to name users
            user_id = identity.app_id
        ctx.user_id = user_id
        policy = await self._resolver.resolve(identity.app_id, user_id)
        ctx.policy = policy
        if key is not None and not policy.gateway_keys_enabled:
            raise invalid_api_key(f"Incorrect API key provided: {PREFIX}{key.key_id}-… (this application does not accept gateway keys).")
        if not policy.enabled:
            who = "application" if not app_level["enabled"] else "user"
            raise forbidden(f"This {who} is disabled on the gateway.")
        if ctx.deployment:
            check_deployment(ctx)


def check_deployment(ctx: RequestContext) -> None:
    """Whether the caller may use the request's deployment: its policy, and its gateway key's own list."""
    if not ctx.policy.allows_deployment(ctx.deployment):
        raise forbidden(f"The application may not use the deployment '{ctx.deployment}'.")
    key = ctx.identity.key if ctx.identity is not None else None
    if key is not None and key.deployments is not None and ctx.deployment not in key.deployments:
        raise forbidden(f"This gateway key may not use the deployment '{ctx.deployment}'.")


def require_admin(ctx_identity, admin_role: str) -> None:
    if not ctx_identity.has_role(admin_role):
        raise forbidden(f"This route needs the '{admin_role}' app role.")


__all__ = ["ApplyPolicy", "EffectivePolicy", "PolicyCache", "PolicyResolver", "check_deployment", "forbidden", "require_admin"]
