"""Sign-in to the admin page without a browser-capable identity provider (local mode).

In Azure the admin page is behind App Service Authentication's browser sign-in: Easy Auth hands
the gateway the signed-in user's principal, roles included. Locally there is no such sign-in, so
`python -m shared.admin.cli admin-login` (run by someone who can read the store, i.e. an operator)
creates a one-time login code and prints a link with it. Opening the link redeems the code — it
works once, within minutes — for a session kept in an HttpOnly, SameSite=Strict cookie. A bearer
token never appears in a URL.

Only hashes of codes and session ids are stored. A session is read-only: it authenticates GET
requests under /sekisho/admin (the page and the data it shows), never a change, so a cookie
cannot be used to alter policies cross-site.
"""
from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ..store import Store

COOKIE = "sekisho_admin"
COOKIE_PATH = "/sekisho/admin"
LOGIN_CODE_SECONDS = 300
SESSION_SECONDS = 8 * 3600


def _hash(kind: str, secret: str) -> str:
    return f"{kind}:" + hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class SessionIdentity:
    """Who a session belongs to; holds the admin role by construction (only admins get one)."""

    actor: str
    admin_role: str
    source: str = "session"

    @property
    def app_id(self) -> str:
        return "admin-session"

    @property
    def user_oid(self) -> str:
        return self.actor

    delegated = False

    def has_role(self, role: str) -> bool:
        return role == self.admin_role


async def create_login_code(store: Store, actor: str) -> str:
    code = secrets.token_urlsafe(32)
    await store.put_admin_session({"id": _hash("code", code), "kind": "code", "actor": actor,
                                   "expires_at": time.time() + LOGIN_CODE_SECONDS, "ttl": LOGIN_CODE_SECONDS})
    return code


async def redeem_login_code(store: Store, code: str) -> str | None:
    """A new session id for a valid, unused code (which is deleted first: it works once)."""
    doc = await store.get_admin_session(_hash("code", code))
    if doc is None or not await store.delete_admin_session(doc["id"]) or doc["expires_at"] < time.time():
        return None
    session = secrets.token_urlsafe(32)
    await store.put_admin_session({"id": _hash("session", session), "kind": "session", "actor": doc["actor"],
                                   "expires_at": time.time() + SESSION_SECONDS, "ttl": SESSION_SECONDS})
    return session


async def session_actor(store: Store, session: str) -> str | None:
    doc: dict[str, Any] | None = await store.get_admin_session(_hash("session", session))
    if doc is None or doc.get("kind") != "session":
        return None
    if doc["expires_at"] < time.time():
        await store.delete_admin_session(doc["id"])
        return None
    return doc["actor"]


def cookie_header(session: str, secure: bool) -> str:
    attributes = [f"{COOKIE}={session}", f"Path={COOKIE_PATH}", f"Max-Age={SESSION_SECONDS}", "HttpOnly", "SameSite=Strict"]
    if secure:
        attributes.append("Secure")
    return "; ".join(attributes)
