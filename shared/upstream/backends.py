"""The Azure OpenAI backends behind each deployment: the catalogue, the choice of backend,
cool-downs after 429s, circuit breaking, and each backend's credentials.

A deployment in the catalogue (store container `deployments`, admin API, CLI) lists backends —
regions, PTU and pay-as-you-go — each with a priority (1 first), a weight within its priority,
the deployment name on that resource, and how to authenticate: the managed identity, or an
api-key held in Key Vault (resolved with azure-keyvault-secrets and cached); local and test
setups may name an environment variable SEKISHO_BACKEND_KEY_* instead. A deployment not in
the catalogue goes to the default backend from the settings (AZURE_OPENAI_ENDPOINT).

Health is kept per instance, per backend and deployment: a backend that answered 429 cools down
for its Retry-After; one that fails `failure_threshold` times in a row (5xx other than 501 and
505, timeouts, refused connections) is skipped for `open_seconds`, then probed by one request.
An empty 500, what some servers answer for a path they do not serve, counts for nothing. Per instance is enough: every instance sees an unhealthy backend within a few requests
of its own, and sharing the state through the store would add a round trip to every request.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .auth import ApiKeyAuth, EntraTokenAuth

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$"


# What the validators below require, stated in the schema too (docs/openapi.json is generated from it).
_CONDITIONAL = [
    {"if": {"required": ["auth"], "properties": {"auth": {"const": "key_vault"}}},
     "then": {"required": ["key_vault_secret"], "properties": {"key_vault_secret": {"type": "string"}}}},
    {"if": {"required": ["auth"], "properties": {"auth": {"const": "api_key_env"}}},
     "then": {"required": ["api_key_env"], "properties": {"api_key_env": {"type": "string"}}}},
]


class BackendSpec(BaseModel):
    """One backend serving the deployment. Backend names are unique within a deployment."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"allOf": _CONDITIONAL})

    name: str = Field(pattern=_NAME)
    endpoint: str = Field(pattern=r"^https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~\-/]*)?$", description="https://<resource>.openai.azure.com")
    deployment: str | None = Field(default=None, description="The deployment's name on this resource (default: the same name).")
    priority: int = Field(default=1, ge=1, le=100)
    weight: int = Field(default=1, ge=1, le=1000)
    auth: Literal["managed_identity", "key_vault", "api_key_env"] = "managed_identity"
    key_vault_secret: str | None = Field(default=None, pattern=r"^https://[A-Za-z0-9.\-]+(:[0-9]{1,5})?/secrets/[A-Za-z0-9\-]+(/[A-Za-z0-9]*)?$",
                                         description="https://<vault>.vault.azure.net/secrets/<name>, for auth=key_vault")
    api_key_env: str | None = Field(default=None, pattern=r"^SEKISHO_BACKEND_KEY_[A-Z0-9_]{1,40}$",
                                    description="For local and test setups: an environment variable holding the key.")
    v1_routes: bool = Field(default=True, description="The resource serves the v1 API (/openai/v1/...); false: v1 calls go to its deployment routes.")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("https", "http") or not parsed.netloc:
            raise ValueError("endpoint must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("key_vault_secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is not None:
            split_secret_uri(value)
        return value


class DeploymentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=_NAME, description="The deployment name clients use.")
    backends: list[BackendSpec] = Field(min_length=1, max_length=20)

    @field_validator("backends")
    @classmethod
    def _unique(cls, backends: list[BackendSpec]) -> list[BackendSpec]:
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError("backend names must be unique within a deployment")
        for backend in backends:
            if backend.auth == "key_vault" and not backend.key_vault_secret:
                raise ValueError(f"backend {backend.name}: auth key_vault needs key_vault_secret")
            if backend.auth == "api_key_env" and not backend.api_key_env:
                raise ValueError(f"backend {backend.name}: auth api_key_env needs api_key_env")
        return backends


def split_secret_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    parts = [p for p in parsed.path.split("/") if p]
    if parsed.scheme != "https" or len(parts) < 2 or parts[0] != "secrets":
        raise ValueError("key_vault_secret must look like https://<vault>.vault.azure.net/secrets/<name>")
    return f"https://{parsed.netloc}", parts[1]


class KeyVaultKeyAuth:
    """An api-key read from Key Vault with the managed identity, cached for an hour."""

    def __init__(self, secret_uri: str, client_factory=None, ttl_seconds: float = 3600.0) -> None:
        self._vault, self._name = split_secret_uri(secret_uri)
        self._factory = client_factory
        self._ttl = ttl_seconds
        self._value: str | None = None
        self._fetched = 0.0
        self._lock = asyncio.Lock()
        self._client = None

    async def headers(self) -> dict[str, str]:
        if self._value is None or time.monotonic() - self._fetched > self._ttl:
            async with self._lock:
                if self._value is None or time.monotonic() - self._fetched > self._ttl:
                    if self._client is None:
                        if self._factory is not None:
                            self._client = self._factory(self._vault)
                        else:
                            from azure.identity.aio import DefaultAzureCredential
                            from azure.keyvault.secrets.aio import SecretClient

                            self._client = SecretClient(self._vault, DefaultAzureCredential())
                    secret = await self._client.get_secret(self._name)
                    self._value, self._fetched = secret.value, time.monotonic()
        return {"api-key": self._value}

    async def close(self) -> None:
        if self._client is not None and hasattr(self._client, "close"):
            await self._client.close()


@dataclass
class BackendHealth:
    cooling_until: float = 0.0  # after a 429
    failures: int = 0
    open_until: float = 0.0  # circuit open
    probing: bool = False


@dataclass
class Backend:
    name: str
    endpoint: str
    deployment: str | None
    priority: int
    weight: int
    auth: object
    v1_routes: bool = True  # serves /openai/v1/...; else v1 calls go to its deployment routes
    health: BackendHealth = field(default_factory=BackendHealth)


class Circuit:
    def __init__(self, failure_threshold: int, open_seconds: float) -> None:
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds

    def available(self, backend: Backend, now: float) -> bool:
        health = backend.health
        if health.cooling_until > now:
            return False
        if health.open_until > now:
            return False
        if health.open_until and health.probing:
            return False  # one probe at a time while half-open
        return True

    def on_success(self, backend: Backend) -> None:
        backend.health.failures = 0
        backend.health.open_until = 0.0
        backend.health.probing = False

    def on_throttled(self, backend: Backend, retry_after: float) -> None:
        backend.health.cooling_until = time.monotonic() + retry_after
        backend.health.probing = False

    def on_failure(self, backend: Backend) -> None:
        health = backend.health
        health.failures += 1
        health.probing = False
        if health.failures >= self.failure_threshold:
            health.open_until = time.monotonic() + self.open_seconds

    def on_attempt(self, backend: Backend, now: float) -> None:
        if backend.health.open_until and backend.health.open_until <= now:
            backend.health.probing = True  # half-open: this request is the probe

    @staticmethod
    def state(backend: Backend, now: float) -> str:
        health = backend.health
        if health.open_until > now:
            return "open"
        if health.open_until:
            return "half-open"
        return "closed"


# Per-deployment state is kept for at most this many names (least recently used go first):
# deployment names come from requests, and a client must not grow the gateway's memory.
MAX_DEPLOYMENTS_KEPT = 512


def _bound(kept: OrderedDict) -> None:
    while len(kept) > MAX_DEPLOYMENTS_KEPT:
        kept.popitem(last=False)


class BackendPool:
    """Backends per deployment, built from the catalogue and cached; health survives reloads.

    State (the cached backend list, the default backend's health) is kept only for deployments
    the gateway knows: in the catalogue, or in SEKISHO_DEPLOYMENTS. A name a request invents
    (an app allowed "*" may name anything) gets a default backend of its own for that call only.
    When no deployment list is configured every name is kept, up to MAX_DEPLOYMENTS_KEPT."""

    def __init__(self, store, default_endpoint: str, default_api_key: str, circuit: Circuit, ttl_seconds: float,
                 key_vault_factory=None, env=None, default_v1_routes: bool = True, known_deployments: tuple[str, ...] = ()) -> None:
        self._default_v1_routes = default_v1_routes
        self._known = frozenset(known_deployments)
        self._store = store
        self._env = env if env is not None else {}
        self.circuit = self._circuit = circuit
        self._ttl = ttl_seconds
        self._kv_factory = key_vault_factory
        self._default_endpoint = default_endpoint
        self._default_auth = ApiKeyAuth(default_api_key) if default_api_key else EntraTokenAuth()
        self._managed_identity = self._default_auth if not default_api_key else EntraTokenAuth()
        # The default backend, one per deployment: health is judged per backend and deployment,
        # so failures on one deployment (or on a path one deployment lacks) never pause another.
        self._default: OrderedDict[str, Backend] = OrderedDict()
        self._cache: OrderedDict[str, tuple[float, list[Backend]]] = OrderedDict()
        self._by_key: dict[tuple, Backend] = {}

    async def backends(self, deployment: str) -> list[Backend]:
        cached = self._cache.get(deployment)
        if cached is not None and cached[0] > time.monotonic():
            self._cache.move_to_end(deployment)
            return cached[1]
        doc = await self._store.get_deployment(deployment) if deployment else None  # "": calls about no deployment (files)
        if doc is None:
            if self._known and deployment and deployment not in self._known:
                # A name nothing knows (the upstream will say 404): no state is kept for it.
                return [Backend("default", self._default_endpoint, None, 1, 1, self._default_auth, self._default_v1_routes)]
            default = self._default.get(deployment)
            if default is None:
                default = self._default[deployment] = Backend("default", self._default_endpoint, None, 1, 1, self._default_auth,
                                                              self._default_v1_routes)
                _bound(self._default)
            backends = [default]
        else:
            spec = DeploymentSpec.model_validate(doc)
            backends = [self._backend(deployment, b) for b in spec.backends]
        self._cache[deployment] = (time.monotonic() + self._ttl, backends)
        self._cache.move_to_end(deployment)
        _bound(self._cache)
        return backends

    def _backend(self, deployment: str, spec: BackendSpec) -> Backend:
        key = (deployment, spec.name, spec.endpoint, spec.deployment, spec.auth, spec.key_vault_secret, spec.api_key_env)
        existing = self._by_key.get(key)
        if existing is not None:
            existing.priority, existing.weight, existing.v1_routes = spec.priority, spec.weight, spec.v1_routes
            return existing  # keep its health and its cached credentials
        if spec.auth == "key_vault":
            auth = KeyVaultKeyAuth(spec.key_vault_secret, self._kv_factory)
        elif spec.auth == "api_key_env":
            auth = ApiKeyAuth(self._env.get(spec.api_key_env, ""))
        else:
            auth = self._managed_identity
        backend = Backend(spec.name, spec.endpoint, spec.deployment, spec.priority, spec.weight, auth, spec.v1_routes)
        self._by_key[key] = backend
        return backend

    def invalidate(self, deployment: str | None = None) -> None:
        if deployment is None:
            self._cache.clear()
        else:
            self._cache.pop(deployment, None)

    def choose(self, backends: list[Backend], exclude: set[str]) -> Backend | None:
        """The first priority with an available backend; weighted random within it."""
        now = time.monotonic()
        usable = [b for b in backends if b.name not in exclude and self._circuit.available(b, now)]
        if not usable:
            return None
        best = min(b.priority for b in usable)
        group = [b for b in usable if b.priority == best]
        chosen = group[0] if len(group) == 1 else random.choices(group, weights=[b.weight for b in group])[0]
        self._circuit.on_attempt(chosen, now)
        return chosen

    def least_cooling(self, backends: list[Backend]) -> Backend | None:
        """When every backend is cooling down after 429s, the one whose cool-down ends first: a
        429 may concern only the request that got it (a large prompt against a tokens-per-minute
        limit), so the gateway asks again rather than refusing on the upstream's behalf. Backends
        whose circuit is open are not asked."""
        now = time.monotonic()
        candidates = [b for b in backends if b.health.open_until <= now and not b.health.probing]
        if not candidates:
            return None
        chosen = min(candidates, key=lambda b: (b.health.cooling_until, b.priority))
        self._circuit.on_attempt(chosen, now)
        return chosen

    def choose_available(self, backends: list[Backend]) -> bool:
        """Whether some backend could be tried right now (without choosing it)."""
        now = time.monotonic()
        return any(self._circuit.available(b, now) for b in backends)

    def any_cooling(self, backends: list[Backend]) -> bool:
        """Whether some backend is waiting out a 429's Retry-After (not a circuit opened by failures)."""
        now = time.monotonic()
        return any(b.health.cooling_until > now and b.health.open_until <= now for b in backends)

    def soonest_available(self, backends: list[Backend]) -> float:
        """Seconds until some backend may be tried again."""
        now = time.monotonic()
        waits = [max(b.health.cooling_until, b.health.open_until if b.health.open_until > now else 0) - now for b in backends]
        return max(0.0, min(waits)) if waits else 0.0

    def status(self) -> list[dict]:
        now = time.monotonic()
        out = []
        for deployment, (_, backends) in sorted(self._cache.items()):
            for b in backends:
                out.append({"deployment": deployment, "backend": b.name, "endpoint": b.endpoint, "priority": b.priority,
                            "weight": b.weight, "circuit": Circuit.state(b, now), "failures": b.health.failures,
                            "cooling_seconds": max(0.0, round(b.health.cooling_until - now, 3))})
        return out

    async def close(self) -> None:
        seen = set()
        for backend in [self._default_auth, *self._by_key.values(), self._managed_identity]:
            auth = backend.auth if isinstance(backend, Backend) else backend
            if id(auth) not in seen:
                seen.add(id(auth))
                await auth.close()
