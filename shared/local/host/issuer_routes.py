"""Serves the local issuer's OpenID discovery document and signing keys beside the functions.

Local mode only: in Azure, Entra ID serves these. The gateway fetches them over HTTP exactly as
it fetches Entra's, so the validation code path is the same."""
from __future__ import annotations

import re

import orjson
from starlette.responses import Response

from ..issuer import ISSUER_PATH, LocalIssuer

_DISCOVERY = re.compile(rf"^{re.escape(ISSUER_PATH)}/([^/]+)/v2\.0/\.well-known/openid-configuration$")
_KEYS = re.compile(rf"^{re.escape(ISSUER_PATH)}/([^/]+)/discovery/v2\.0/keys$")


class IssuerRoutes:
    def __init__(self, app, issuer: LocalIssuer) -> None:
        self._app = app
        self._issuer = issuer
        self.key_fetches = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(ISSUER_PATH):
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        host = dict(scope["headers"]).get(b"host", b"127.0.0.1").decode()
        base = f"http://{host}"
        if (match := _DISCOVERY.match(path)) and match.group(1) == self._issuer.tenant_id:
            body = self._issuer.openid_configuration(base, match.group(1))
        elif (match := _KEYS.match(path)) and match.group(1) == self._issuer.tenant_id:
            self.key_fetches += 1
            body = LocalIssuer(self._issuer.path.parent).jwks()  # re-read: `issuer rotate` may have added a key
        else:
            body = None
        response = Response(orjson.dumps(body or {"error": "not_found"}), status_code=200 if body else 404, media_type="application/json")
        await response(scope, receive, send)
