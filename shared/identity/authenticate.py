"""Who is calling: the Authenticate stage turns a bearer token (or Easy Auth's principal) into
an Identity — the calling app, its tenant, the signed-in user for delegated tokens, app roles."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from ..context import RequestContext
from ..pipeline import Stage
from . import easy_auth
from .gateway_keys import KeyVerifier, invalid_api_key, looks_like_key
from .tokens import TokenValidator, invalid_token


@dataclass(frozen=True)
class Identity:
    app_id: str
    tenant_id: str
    delegated: bool  # a user signed in through the app (the token has scopes)
    user_oid: str | None  # that user's object id, for delegated tokens
    roles: tuple[str, ...]
    source: str  # "bearer", "easy_auth", "easy_auth_browser" or "gateway_key"
    token_version: str | None
    key: Any = None  # gateway_keys.KeyGrant, for a gateway key

    def has_role(self, role: str) -> bool:
        return role in self.roles


def identity_from_claims(claims: dict[str, Any], source: str, version: str | None) -> Identity:
    app_id = claims.get("azp") or claims.get("appid")
    delegated = bool(claims.get("scp"))
    roles = claims.get("roles") or ()
    return Identity(
        app_id=str(app_id),
        tenant_id=str(claims["tid"]),
        delegated=delegated,
        user_oid=str(claims["oid"]) if delegated and claims.get("oid") else None,
        roles=tuple(r for r in roles if isinstance(r, str)),
        source=source,
        token_version=version,
    )


class Authenticator:
    def __init__(self, validator: TokenValidator | None, easy_auth_enabled: bool, keys: KeyVerifier | None = None) -> None:
        self._validator = validator
        self._easy_auth = easy_auth_enabled
        self._keys = keys  # gateway keys, when a pepper is configured

    async def authenticate(self, request: Request) -> Identity:
        if self._easy_auth:
            principal = request.headers.get(easy_auth.HEADER)
            if principal:
                claims = easy_auth.claims_from_principal(principal)
                source = "easy_auth_browser" if claims.get(easy_auth.BROWSER_SIGN_IN) else "easy_auth"
                return identity_from_claims(claims, source, claims.get("ver"))
        header = request.headers.get("authorization")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise invalid_token("The Authorization header must be 'Bearer <token>'.")
            token = token.strip()
        else:
            # Tools that can only be given an api-key put it here (AzureOpenAI(api_key=…)); what
            # they send may be a gateway key or an Entra token.
            token = (request.headers.get("api-key") or "").strip()
            if not token:
                raise invalid_token("Missing credentials: send 'Authorization: Bearer <Entra ID access token>' "
                                    "(or, for a tool that can only send a key, 'api-key: <gateway key>').")
        if looks_like_key(token):
            return await self._key_identity(token, request)
        if self._validator is None:
            raise invalid_token("Tokens are not accepted here: no tenant is configured.")
        validated = await self._validator.validate(token)
        return identity_from_claims(validated.claims, "bearer", validated.version)

    async def _key_identity(self, key: str, request: Request) -> Identity:
        if self._keys is None:
            raise invalid_api_key("Gateway keys are not accepted here (no key pepper is configured); use an Entra ID token.")
        grant = await self._keys.verify(key, request.client.host if request.client else "unknown")
        return Identity(app_id=grant.app_id, tenant_id="", delegated=False, user_oid=None, roles=(), source="gateway_key",
                        token_version=None, key=grant)


class Authenticate(Stage):
    name = "authenticate"

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    def record(self, ctx: RequestContext) -> dict[str, Any]:
        key = ctx.identity.key if ctx.identity is not None else None
        return {"gateway_key": key.key_id} if key is not None else {}  # its id, never its value

    async def before(self, ctx: RequestContext) -> None:
        identity = await self._authenticator.authenticate(ctx.http)
        if identity.source == "easy_auth_browser":
            raise invalid_token("A browser sign-in opens the admin page only; model calls need an access token for the gateway.")
        ctx.identity = identity
        ctx.app_id, ctx.tenant_id = identity.app_id, identity.tenant_id or None
        ctx.user_id = identity.user_oid
