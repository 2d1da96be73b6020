"""App Service Authentication ("Easy Auth"): the caller as the platform validated it.

When Easy Auth is on, the platform validates the token and passes the caller's claims in
`X-MS-CLIENT-PRINCIPAL` (base64 JSON). The platform strips that header from incoming requests,
so it can be trusted, but only when Easy Auth really is on: the gateway reads it only when
SEKISHO_EASY_AUTH_ENABLED says so.
"""
from __future__ import annotations

import base64
from typing import Any

import orjson

from .tokens import invalid_token

HEADER = "x-ms-client-principal"
# Marks a principal from a browser sign-in (cookies): it may read the admin page, nothing else —
# a cookie is sent with cross-site requests, so it must never authorise a change or a model call.
BROWSER_SIGN_IN = "_browser_sign_in"

# Easy Auth passes some claims under their long WS-Federation names.
_CLAIM_NAMES = {
    "http://schemas.microsoft.com/identity/claims/tenantid": "tid",
    "http://schemas.microsoft.com/identity/claims/objectidentifier": "oid",
    "http://schemas.microsoft.com/identity/claims/scope": "scp",
    "http://schemas.microsoft.com/ws/2008/06/identity/claims/role": "roles",
}


def claims_from_principal(header_value: str) -> dict[str, Any]:
    """The principal's claims as a token-like dict (`roles` a list, other claims single values)."""
    try:
        principal = orjson.loads(base64.b64decode(header_value, validate=False))
        entries = principal["claims"]
        role_type = principal.get("role_typ") or "roles"
    except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        raise invalid_token("X-MS-CLIENT-PRINCIPAL is not a valid client principal.") from None
    if not isinstance(entries, list):
        raise invalid_token("X-MS-CLIENT-PRINCIPAL is not a valid client principal.")
    claims: dict[str, Any] = {"roles": []}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("typ"), str):
            continue
        kind, value = entry["typ"], entry.get("val")
        if kind == role_type or _CLAIM_NAMES.get(kind) == "roles" or kind == "roles":
            claims["roles"].append(value)
        else:
            claims.setdefault(_CLAIM_NAMES.get(kind, kind), value)
    if not (claims.get("azp") or claims.get("appid")) and claims.get("aud") and claims.get("oid"):
        # A browser sign-in (the admin page): Easy Auth passes the ID token's claims, which name
        # no client application — the user signed in to the gateway's own app registration.
        # Treat it as that app acting for that user, so the user's app roles apply.
        claims["azp"] = claims["aud"]
        claims.setdefault("scp", "openid")
        claims[BROWSER_SIGN_IN] = True
    if not claims.get("tid") or not (claims.get("azp") or claims.get("appid")):
        raise invalid_token("The client principal names no tenant or client application.")
    return claims
