"""Signing keys: fetched through OpenID discovery over real HTTP, cached, refreshed on a new
`kid` once, and never hammered by floods of unknown `kid`s."""
from __future__ import annotations

import asyncio
import uuid

import jwt
import pytest
from aiohttp import web

from shared.errors import GatewayError
from shared.identity.tokens import JwksCache, TokenValidator
from shared.local.issuer import LocalIssuer, new_key


@pytest.fixture
async def key_server(tmp_path):
    """A stand-in for login.microsoftonline.com that counts key fetches."""
    issuer = LocalIssuer(tmp_path)
    counts = {"discovery": 0, "keys": 0}

    async def discovery(request):
        counts["discovery"] += 1
        return web.json_response(issuer.openid_configuration(f"http://{request.host}", request.match_info["tenant"]))

    async def keys(request):
        counts["keys"] += 1
        return web.json_response(issuer.jwks())

    app = web.Application()
    app.router.add_get("/.local-issuer/{tenant}/v2.0/.well-known/openid-configuration", discovery)
    app.router.add_get("/.local-issuer/{tenant}/discovery/v2.0/keys", keys)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield issuer, f"http://127.0.0.1:{port}/.local-issuer", counts
    await runner.cleanup()


def _validator(issuer, authority, min_refresh):
    cache = JwksCache(authority, min_refresh_seconds=min_refresh)
    return cache, TokenValidator(cache, (issuer.tenant_id,), (issuer.client_id, issuer.app_id_uri), leeway_seconds=30)


async def test_keys_are_fetched_once_and_cached(key_server):
    issuer, authority, counts = key_server
    cache, validator = _validator(issuer, authority, 60)
    tokens = [issuer.mint("app-1") for _ in range(20)]
    results = await asyncio.gather(*(validator.validate(t) for t in tokens))
    assert all(r.app_id == "app-1" for r in results)
    assert counts["keys"] == 1  # twenty concurrent first requests, one fetch
    await cache.close()


async def test_key_rotation_fetches_the_new_kid_once(key_server):
    issuer, authority, counts = key_server
    cache, validator = _validator(issuer, authority, 0.2)
    await validator.validate(issuer.mint("app-1"))
    issuer.rotate()
    await asyncio.sleep(0.25)
    rotated = issuer.mint("app-1")
    await asyncio.gather(*(validator.validate(rotated) for _ in range(10)))
    assert counts["keys"] == 2
    await validator.validate(issuer.mint("app-1"))
    assert counts["keys"] == 2
    await cache.close()


async def test_flood_of_unknown_kids_does_not_hammer_the_key_endpoint(key_server):
    issuer, authority, counts = key_server
    cache, validator = _validator(issuer, authority, 60)
    await validator.validate(issuer.mint("app-1"))
    claims = jwt.decode(issuer.mint("app-1"), options={"verify_signature": False})
    key = new_key().private_key()
    forged = [jwt.encode(claims, key, algorithm="RS256", headers={"kid": uuid.uuid4().hex}) for _ in range(200)]
    outcomes = await asyncio.gather(*(validator.validate(t) for t in forged), return_exceptions=True)
    assert all(isinstance(o, GatewayError) and o.status == 401 for o in outcomes)
    assert counts["keys"] <= 2  # at most one refresh for the whole flood
    await cache.close()


async def test_unreachable_key_endpoint_is_503_not_401(tmp_path):
    issuer = LocalIssuer(tmp_path)
    cache, validator = _validator(issuer, "http://127.0.0.1:9/.local-issuer", 60)
    with pytest.raises(GatewayError) as caught:
        await validator.validate(issuer.mint("app-1"))
    assert caught.value.status == 503 and caught.value.code == "auth_unavailable"
    await cache.close()


async def test_a_remembered_token_still_expires(key_server):
    issuer, authority, counts = key_server
    cache, validator = _validator(issuer, authority, 60)
    validator._leeway = 0  # noqa: SLF001 - make expiry exact for the test
    token = issuer.mint("app-1", lifetime_seconds=2)
    await validator.validate(token)
    await validator.validate(token)  # remembered
    await asyncio.sleep(2.1)
    with pytest.raises(GatewayError) as caught:
        await validator.validate(token)
    assert "expired" in caught.value.message
    await cache.close()


async def test_tenant_spelling_does_not_multiply_key_caches(key_server):
    issuer, authority, counts = key_server
    cache, validator = _validator(issuer, authority, 60)
    await validator.validate(issuer.mint("app-1"))
    upper = issuer.tenant_id.upper()
    token = issuer.mint("app-1", tid=upper, iss=f"https://login.microsoftonline.com/{upper}/v2.0")
    assert (await validator.validate(token)).app_id == "app-1"
    assert counts["keys"] == 1  # the same tenant, the same cached keys
    await cache.close()
