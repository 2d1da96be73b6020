"""Entra ID access-token validation, in code, on the hot path.

A bearer token is accepted only if every check passes, in this order (cheap checks first, and
nothing is fetched for a token that names a tenant outside the allow-list):
header parses → alg is RS256 → claims parse → `tid` is an allowed tenant → issuer is that
tenant's v1 (`https://sts.windows.net/{tid}/`) or v2 (`https://login.microsoftonline.com/{tid}/v2.0`)
issuer → the signing key `kid` is in the tenant's JWKS → signature → `exp`/`nbf` with leeway →
audience is one of ours (client id or App ID URI).

Keys come from OpenID discovery (`{authority}/{tid}/v2.0/.well-known/openid-configuration` →
`jwks_uri`), fetched with aiohttp (never blocking the loop), cached, and refreshed when a token
names an unknown `kid` — at most once per `min_refresh_seconds` per tenant, with one fetch in
flight, so a flood of forged `kid`s cannot hammer the key endpoint.
"""
from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import orjson
from jwt.algorithms import RSAAlgorithm

from ..errors import GatewayError

ALGORITHM = "RS256"


def invalid_token(message: str) -> GatewayError:
    return GatewayError(401, "invalid_token", message, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def v1_issuer(tenant_id: str) -> str:
    return f"https://sts.windows.net/{tenant_id}/"


def v2_issuer(tenant_id: str) -> str:
    return f"https://login.microsoftonline.com/{tenant_id}/v2.0"


@dataclass
class _TenantKeys:
    keys: dict[str, Any] = field(default_factory=dict)  # kid -> public key object
    fetched_at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    fetches: int = 0


class KeyFetchError(Exception):
    pass


class JwksCache:
    """Signing keys per tenant, from OpenID discovery, cached and refreshed on unknown `kid`."""

    def __init__(self, authority: str, min_refresh_seconds: float = 60.0, max_age_seconds: float = 86400.0) -> None:
        self._authority = authority.rstrip("/")
        self._min_refresh = min_refresh_seconds
        self._max_age = max_age_seconds
        self._tenants: dict[str, _TenantKeys] = {}
        self._session: aiohttp.ClientSession | None = None

    def fetch_count(self, tenant_id: str) -> int:
        tenant = self._tenants.get(tenant_id)
        return tenant.fetches if tenant else 0

    async def key_for(self, tenant_id: str, kid: str):
        tenant = self._tenants.setdefault(tenant_id, _TenantKeys())
        if kid in tenant.keys and not self._stale(tenant):
            return tenant.keys[kid]
        async with tenant.lock:  # one fetch in flight; the others wait for it and reuse its result
            if self._stale(tenant) or (kid not in tenant.keys and self._may_refresh(tenant)):
                await self._refresh(tenant_id, tenant)
        return tenant.keys.get(kid)

    def _stale(self, tenant: _TenantKeys) -> bool:
        return time.monotonic() - tenant.fetched_at > self._max_age

    def _may_refresh(self, tenant: _TenantKeys) -> bool:
        # Fetched moments ago and the kid was not there: do not ask again yet.
        return not tenant.fetched_at or time.monotonic() - tenant.fetched_at >= self._min_refresh

    async def _refresh(self, tenant_id: str, tenant: _TenantKeys) -> None:
        tenant.fetches += 1
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            discovery_url = f"{self._authority}/{tenant_id}/v2.0/.well-known/openid-configuration"
            async with self._session.get(discovery_url) as response:
                response.raise_for_status()
                jwks_uri = (await response.json(content_type=None))["jwks_uri"]
            async with self._session.get(jwks_uri) as response:
                response.raise_for_status()
                jwks = await response.json(content_type=None)
            published = jwks.get("keys", []) if isinstance(jwks, dict) else []
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError, TypeError) as exc:
            raise KeyFetchError(f"could not fetch signing keys for tenant {tenant_id}: {exc}") from exc
        finally:
            tenant.fetched_at = time.monotonic()  # failures are rate-limited too
        keys = {}
        for jwk in published:
            if isinstance(jwk, dict) and jwk.get("kty") == "RSA" and jwk.get("kid") and jwk.get("use", "sig") == "sig":
                try:
                    keys[jwk["kid"]] = RSAAlgorithm.from_jwk(jwk)
                except (jwt.InvalidKeyError, ValueError, TypeError, KeyError):
                    continue  # one malformed key must not discard the others
        tenant.keys = keys

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass(frozen=True)
class ValidatedToken:
    claims: dict[str, Any]
    version: str  # "1.0" or "2.0"

    @property
    def tenant_id(self) -> str:
        return self.claims["tid"]

    @property
    def app_id(self) -> str | None:
        return self.claims.get("azp") if self.version == "2.0" else self.claims.get("appid")

    @property
    def delegated(self) -> bool:
        """A user signed in (scopes), rather than an app acting as itself (app roles only)."""
        return bool(self.claims.get("scp"))

    @property
    def roles(self) -> tuple[str, ...]:
        roles = self.claims.get("roles") or ()
        return tuple(r for r in roles if isinstance(r, str))


def _b64json(segment: str) -> dict[str, Any]:
    padded = segment + "=" * (-len(segment) % 4)
    value = orjson.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


_STRING_CLAIMS = ("azp", "appid", "oid", "scp")


def _check_claim_types(claims: dict[str, Any]) -> None:
    """The identity claims the gateway reads have Entra's types (a signed token can still carry
    anything: `roles` as an object would otherwise read as the list of its keys)."""
    for name in _STRING_CLAIMS:
        if claims.get(name) is not None and not isinstance(claims[name], str):  # null reads as absent
            raise invalid_token(f"The token's {name!r} claim must be a string.")
    roles = claims.get("roles")
    if roles is not None and not (isinstance(roles, list) and all(isinstance(r, str) for r in roles)):
        raise invalid_token("The token's 'roles' claim must be a list of strings.")


_VERIFIED_CACHE_SIZE = 10_000
_VERIFIED_REUSE_SECONDS = 600.0


class TokenValidator:
    """Validates tokens; a token that passed is remembered (by its exact text) for up to ten
    minutes, so an app reusing its token for an hour costs one RSA verification per ten minutes
    instead of one per request. Expiry is still checked on every use."""

    def __init__(self, keys: JwksCache, tenant_ids: tuple[str, ...], audiences: tuple[str, ...], leeway_seconds: float = 60.0) -> None:
        self._keys = keys
        self._tenants = frozenset(t.lower() for t in tenant_ids)
        self._audiences = tuple(audiences)
        self._leeway = leeway_seconds
        self._verified: dict[str, tuple[float, ValidatedToken]] = {}

    async def validate(self, token: str) -> ValidatedToken:
        remembered = self._verified.get(token)
        if remembered is not None:
            verified_at, result = remembered
            if time.time() < result.claims["exp"] + self._leeway and time.monotonic() - verified_at < _VERIFIED_REUSE_SECONDS:
                return result
            del self._verified[token]
        result = await self._verify(token)
        if len(self._verified) >= _VERIFIED_CACHE_SIZE:
            self._verified.clear()  # bounded; the next requests simply verify again
        self._verified[token] = (time.monotonic(), result)
        return result

    async def _verify(self, token: str) -> ValidatedToken:
        parts = token.split(".")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise invalid_token("The bearer token is not a JWT (expected three dot-separated parts).")
        try:
            header = _b64json(parts[0])
            unverified = _b64json(parts[1])
        except (ValueError, UnicodeError, orjson.JSONDecodeError):
            raise invalid_token("The bearer token's header or payload is not base64url-encoded JSON.") from None
        if header.get("alg") != ALGORITHM:
            raise invalid_token(f"Token algorithm {header.get('alg')!r} is not accepted; tokens must be signed with RS256.")
        if not parts[2]:
            raise invalid_token("The token is not signed.")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise invalid_token("The token header has no key id (kid).")
        tenant_id = unverified.get("tid")
        if not isinstance(tenant_id, str) or tenant_id.lower() not in self._tenants:
            raise invalid_token("The token was issued by a tenant that this gateway does not accept.")
        tenant_id = tenant_id.lower()  # one key cache per tenant, whatever the spelling
        issuer = unverified.get("iss")
        if issuer == v2_issuer(unverified["tid"]) or issuer == v2_issuer(tenant_id):
            version = "2.0"
        elif issuer == v1_issuer(unverified["tid"]) or issuer == v1_issuer(tenant_id):
            version = "1.0"
        else:
            raise invalid_token("The token issuer is not the Entra ID issuer of its tenant.")
        try:
            key = await self._keys.key_for(tenant_id, kid)
        except KeyFetchError as exc:
            raise GatewayError(503, "auth_unavailable", f"Token signing keys are unavailable: {exc}", error_type="server_error") from None
        if key is None:
            raise invalid_token("The token was signed with a key (kid) that the tenant does not publish.")
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[ALGORITHM],
                audience=list(self._audiences),
                issuer=issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "aud", "iss", "tid"], "verify_nbf": True},
            )
        except jwt.ExpiredSignatureError:
            raise invalid_token("The token has expired.") from None
        except jwt.ImmatureSignatureError:
            raise invalid_token("The token is not valid yet (nbf/iat in the future).") from None
        except jwt.InvalidAudienceError:
            raise invalid_token("The token's audience is not this gateway.") from None
        except jwt.InvalidSignatureError:
            raise invalid_token("The token signature does not verify.") from None
        except jwt.MissingRequiredClaimError as exc:
            raise invalid_token(f"The token lacks the required claim {exc.claim!r}.") from None
        except jwt.InvalidTokenError as exc:
            raise invalid_token(f"The token is invalid: {exc}.") from None
        _check_claim_types(claims)
        token_info = ValidatedToken(claims=claims, version=version)
        if not token_info.app_id:
            raise invalid_token("The token names no client application (azp/appid).")
        return token_info
