"""A local stand-in for Entra ID: a signing key pair, its JWKS, and tokens shaped like Entra's.

Used by the local host and the tests so that the gateway runs the same token validation as in
Azure: tokens carry Entra's v1/v2 claims and issuers (with a local tenant id), are RS256-signed,
and their keys are served through OpenID discovery by the local host. The key pair and the
local tenant/client ids are created on first use in the data folder (never committed).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from ..identity.tokens import v1_issuer, v2_issuer

ISSUER_PATH = "/.local-issuer"  # where the local host serves discovery and keys


@dataclass
class SigningKey:
    kid: str
    private_pem: str

    def private_key(self):
        # Loading checks the RSA key, which is slow: load once per SigningKey.
        if "_loaded" not in self.__dict__:
            self.__dict__["_loaded"] = serialization.load_pem_private_key(self.private_pem.encode(), password=None)
        return self.__dict__["_loaded"]

    def to_dict(self) -> dict[str, str]:
        return {"kid": self.kid, "private_pem": self.private_pem}

    def public_jwk(self) -> dict[str, Any]:
        jwk = json.loads(RSAAlgorithm.to_jwk(self.private_key().public_key()))
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}


def new_key() -> SigningKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return SigningKey(kid=uuid.uuid4().hex[:16], private_pem=pem.decode())


class LocalIssuer:
    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / "local-issuer.json"
        if self.path.exists():
            state = json.loads(self.path.read_text())
        else:
            state = {
                "tenant_id": str(uuid.uuid4()),
                "client_id": str(uuid.uuid4()),
                "keys": [new_key().to_dict()],
            }
            self._save(state)
        self.tenant_id: str = state["tenant_id"]
        self.client_id: str = state["client_id"]  # the gateway's own app registration
        self.keys = [SigningKey(**k) for k in state["keys"]]

    @property
    def app_id_uri(self) -> str:
        return f"api://{self.client_id}"

    def _save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(self.path)

    def rotate(self) -> str:
        """Add a new signing key and sign with it from now on; old keys stay published."""
        self.keys.append(new_key())
        self._save({"tenant_id": self.tenant_id, "client_id": self.client_id, "keys": [k.to_dict() for k in self.keys]})
        return self.keys[-1].kid

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.keys]}

    def openid_configuration(self, base_url: str, tenant_id: str) -> dict[str, Any]:
        root = f"{base_url.rstrip('/')}{ISSUER_PATH}/{tenant_id}"
        return {
            "issuer": v2_issuer(tenant_id),
            "jwks_uri": f"{root}/discovery/v2.0/keys",
            "token_endpoint": f"{root}/oauth2/v2.0/token",
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def gateway_settings(self, base_url: str) -> dict[str, str]:
        """The settings that make a gateway trust this issuer."""
        return {
            "SEKISHO_AUTH_AUTHORITY": base_url.rstrip("/") + ISSUER_PATH,
            "SEKISHO_AUTH_TENANT_IDS": self.tenant_id,
            "SEKISHO_AUTH_AUDIENCES": f"{self.client_id},{self.app_id_uri}",
        }

    def mint(
        self,
        app_id: str,
        *,
        user_oid: str | None = None,
        roles: tuple[str, ...] | list[str] = (),
        version: str = "2.0",
        lifetime_seconds: int = 3600,
        audience: str | None = None,
        scopes: str = "user_impersonation",
        name: str | None = None,
        **overrides: Any,
    ) -> str:
        """A token as Entra would issue it to `app_id` for this gateway.

        App-only (no `user_oid`): `roles`, `idtyp: app`, `oid`/`sub` of the app's service
        principal. Delegated (`user_oid`): `scp`, the user's `oid`, name and username."""
        now = int(time.time())
        delegated = user_oid is not None
        claims: dict[str, Any] = {
            "aud": audience or (self.app_id_uri if version == "1.0" else self.client_id),
            "iss": v2_issuer(self.tenant_id) if version == "2.0" else v1_issuer(self.tenant_id),
            "iat": now, "nbf": now, "exp": now + lifetime_seconds,
            "tid": self.tenant_id,
            "oid": user_oid if delegated else str(uuid.uuid5(uuid.NAMESPACE_URL, f"sp:{app_id}")),
            "uti": uuid.uuid4().hex[:22], "ver": version,
        }
        claims["sub"] = claims["oid"]
        if version == "2.0":
            claims["azp"], claims["azpacr"] = app_id, "1"
        else:
            claims["appid"], claims["appidacr"] = app_id, "1"
        if delegated:
            claims["scp"] = scopes
            claims["name"] = name or "Local User"
            claims["preferred_username" if version == "2.0" else "upn"] = f"{user_oid[:8]}@local.test"
        else:
            claims["idtyp"] = "app"
        if roles:
            claims["roles"] = list(roles)
        claims.update(overrides)
        key = self.keys[-1]
        return jwt.encode(claims, key.private_key(), algorithm="RS256", headers={"kid": key.kid, "typ": "JWT"})
