"""Policies: what an app, and each of its users, may do.

Three layers, each a partial `PolicySettings`: built-in defaults ← the `defaults` document ←
the app's document ← the user's document (within the app). A field left out (None) inherits.
Later issues add fields (limits, guards, cache, retries) to `PolicySettings`; merging is generic.

Documents live in the store's `policies` container, partitioned by app id; the defaults under
the reserved partition `_defaults`. The admin API and the CLI both validate through these models.
"""
from __future__ import annotations

import functools
from datetime import datetime, timezone
from typing import Annotated, Any, Callable, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from ..guards.content_safety import ContentSafetySettings, SafetyPolicy
from ..guards.normalize import Folding
from ..guards.personal_data import PersonalDataPolicy, PersonalDataSettings
from ..quota.alerts import DEFAULT_THRESHOLDS, BudgetAlertSettings, thresholds_of
from ..guards.rules import GuardRule, GuardSettings, LeakProtection, RuleSet

DEFAULTS_PARTITION = "_defaults"
DEFAULTS_ID = "defaults"
APP_DOC_ID = "app"
_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@\-]{0,127}$"


class Limits(BaseModel):
    """Quota limits for one subject (the app as a whole, or each of its users). None: no limit.
    Windows are calendar-aligned in SEKISHO_QUOTA_TIMEZONE; spend is in SEKISHO_CURRENCY."""

    model_config = ConfigDict(extra="forbid")

    # Upper bounds keep counters within 64-bit integers (spend is counted in nano-units).
    requests_per_minute: int | None = Field(default=None, ge=0, le=10**15)
    tokens_per_minute: int | None = Field(default=None, ge=0, le=10**15)
    tokens_per_day: int | None = Field(default=None, ge=0, le=10**15)
    spend_per_month: float | None = Field(default=None, ge=0, le=10**9)


class SystemPrompt(BaseModel):
    """The app's system prompt, put into every chat/responses request.

    `mode`: prepend (before everything), append (after the client's own system messages), or
    replace (the client's system messages are removed). `client_system`: what to do with the
    client's system/developer messages: keep, drop, or reject the request (400).
    The text may use {app_name}, {app_id}, {user_id} and {date}."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=100_000)
    mode: Literal["prepend", "append", "replace"] = "prepend"
    client_system: Literal["keep", "drop", "reject"] = "keep"


class CacheSettings(BaseModel):
    """The response cache for an app. Entries are exact matches on the final upstream request."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    ttl_seconds: int | None = Field(default=None, ge=1, le=30 * 86400)
    cache_nondeterministic: bool | None = Field(default=None, description="Also cache requests with temperature > 0 (or unset) or n > 1.")
    replay_only: bool | None = Field(default=None, description="A miss is refused with 409 cache_miss instead of calling the model.")
    allow_replay_header: bool | None = Field(default=None, description="Let a request ask for replay-only with x-sekisho-cache: replay-only.")
    shared_scope: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:\-]{1,64}$", description="Share entries with the apps naming the same scope (default: the app's own).")
    per_user: bool | None = Field(default=None, description="Each end user gets their own entries: one user's answer is never served to another.")


class RetrySettings(BaseModel):
    """Synchronous retries of 429s, 5xx and connection errors, within a time budget."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int | None = Field(default=None, ge=1, le=10)
    time_budget_seconds: float | None = Field(default=None, ge=0, le=600)
    base_delay_ms: int | None = Field(default=None, ge=1, le=10_000)
    max_delay_seconds: float | None = Field(default=None, ge=0.01, le=120)


class AsyncJobSettings(BaseModel):
    """Async mode: requests that wait out 429s in a Durable Functions orchestration."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(default=None, description="Accept `Prefer: respond-async` (202 and a status URL).")
    on_budget_exhausted: bool | None = Field(default=None, description="Turn a request whose synchronous retry budget ran out on 429s into a job instead of answering 429.")
    max_attempts: int | None = Field(default=None, ge=1, le=100, description="Upstream attempts per job (each attempt may itself fail over across backends).")
    max_wait_seconds: int | None = Field(default=None, ge=1, le=86_400, description="Total time a job may spend waiting on Retry-After timers.")
    retention_hours: int | None = Field(default=None, ge=1, le=720, description="How long a job and its result stay readable.")


class GatewayKeySettings(BaseModel):
    """Api-keys for the app's tools that cannot send an Entra ID token (identity/gateway_keys.py)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(default=None, description="Accept the app's gateway keys (api-key header or Bearer). Default off.")


class PolicySettings(BaseModel):
    """One layer of policy. Every field is optional: None means "inherit"."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    owner: str | None = Field(default=None, max_length=128, description="Who answers for the app's use and cost (chargeback).")
    contact: str | None = Field(default=None, max_length=256, description="How to reach the owner (an address, a team channel).")
    cost_centre: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._:/\-]{0,63}$",
                                    description="The cost centre the app's usage is charged to (reports, FOCUS exports).")
    allowed_deployments: list[Annotated[str, Field(max_length=64, pattern=r"\S")]] | None = Field(default=None, description='Deployment names, or ["*"] for any.')
    trust_user_header: bool | None = Field(default=None, description="Take the end user from x-sekisho-user / body `user` (app-only tokens).")
    content_logging: Literal["full", "redacted", "metadata"] | None = None
    retention_days: int | None = Field(default=None, ge=1, le=3650)
    app_limits: Limits | None = Field(default=None, description="Limits on the app as a whole (all its users together).")
    user_limits: Limits | None = Field(default=None, description="Limits on each end user of the app; a user layer overrides them for one user.")
    budget_alerts: BudgetAlertSettings | None = Field(default=None, description="Alerts when tokens_per_day or spend_per_month reach a share of their limit.")
    default_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000, description="Reserved for the answer when the request sets no max_tokens.")
    quota_on_store_failure: Literal["closed", "open"] | None = Field(default=None, description="closed: refuse with 503; open: count in memory until the store is back.")
    system_prompt: SystemPrompt | None = None
    guards: GuardSettings | None = None
    cache: CacheSettings | None = None
    retry: RetrySettings | None = None
    async_jobs: AsyncJobSettings | None = None
    gateway_keys: GatewayKeySettings | None = None
    content_safety: ContentSafetySettings | None = None
    personal_data: PersonalDataSettings | None = None

    @field_validator("allowed_deployments")
    @classmethod
    def _deployments(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if any(not v.strip() or len(v) > 64 for v in value):
            raise ValueError("deployment names must be 1 to 64 characters")
        return sorted({v.strip() for v in value})


class EffectivePolicy(BaseModel):
    """The merged policy for one request: every field resolved."""

    model_config = ConfigDict(frozen=True)

    app_id: str
    app_name: str | None
    registered: bool
    owner: str | None = None
    contact: str | None = None
    cost_centre: str | None = None
    enabled: bool
    allowed_deployments: tuple[str, ...]
    trust_user_header: bool
    content_logging: Literal["full", "redacted", "metadata"]
    retention_days: int
    app_limits: Limits = Field(default_factory=Limits)
    user_limits: Limits = Field(default_factory=Limits)
    alert_thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS  # per cent; () when budget alerts are off
    default_completion_tokens: int = 1024
    quota_on_store_failure: Literal["closed", "open"] = "closed"
    system_prompt: SystemPrompt | None = None
    guard_rules: tuple[GuardRule, ...] = ()
    output_action: Literal["redact", "block"] = "block"
    redaction: str = "[redacted]"
    leak_protection: LeakProtection = Field(default_factory=LeakProtection)
    fold_kana: bool = True
    fold_confusables: bool = True
    cache: CacheSettings = Field(default_factory=CacheSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    async_jobs: AsyncJobSettings = Field(default_factory=AsyncJobSettings)
    gateway_keys_enabled: bool = False
    content_safety: SafetyPolicy = SafetyPolicy()
    personal_data: PersonalDataPolicy = PersonalDataPolicy()
    _derived: dict[str, Any] = PrivateAttr(default_factory=dict)

    def derived(self, name: str, build: Callable[["EffectivePolicy"], Any]) -> Any:
        """`build(self)`, worked out once and kept with the policy (which the resolver reuses while
        its documents are unchanged): what a stage reads from the policy on every request, in the
        form it needs (the quota's list of limits, the compiled guard rules)."""
        derived = self.__pydantic_private__["_derived"]  # not self._derived: pydantic's __getattr__ is slow
        value = derived.get(name)
        if value is None:
            value = derived[name] = build(self)
        return value

    def rule_set(self, direction: str) -> RuleSet:
        """This policy's guard rules for one direction, compiled on first use and kept with it."""
        return self.derived(f"rules:{direction}", lambda policy: RuleSet(
            [r for r in policy.guard_rules if r.applies_to in (direction, "both")], policy.folding))

    @property
    def folding(self) -> Folding:
        return self.derived("folding", lambda policy: Folding(kana=policy.fold_kana, confusables=policy.fold_confusables))

    def allows_deployment(self, deployment: str) -> bool:
        return "*" in self.allowed_deployments or deployment in self.allowed_deployments


def builtin_defaults(content_logging: str, retention_days: int) -> PolicySettings:
    return PolicySettings(
        enabled=True, allowed_deployments=["*"], trust_user_header=False,
        content_logging=content_logging, retention_days=retention_days,
        app_limits=Limits(), user_limits=Limits(), default_completion_tokens=1024, quota_on_store_failure="closed",
        cache=CacheSettings(enabled=False, ttl_seconds=86400, cache_nondeterministic=False, replay_only=False, allow_replay_header=False, per_user=False),
        retry=RetrySettings(max_attempts=4, time_budget_seconds=30, base_delay_ms=500, max_delay_seconds=10),
        async_jobs=AsyncJobSettings(enabled=True, on_budget_exhausted=False, max_attempts=10, max_wait_seconds=1800, retention_hours=24),
    )


def _deep_merge(into: dict[str, Any], layer: dict[str, Any]) -> None:
    for name, value in layer.items():
        if name == "rules" and isinstance(value, list) and isinstance(into.get(name), list):
            # Guard rules add up across layers; a later rule with the same id replaces the earlier.
            by_id = {rule["id"]: rule for rule in into[name]}
            by_id.update({rule["id"]: rule for rule in value})
            into[name] = list(by_id.values())
        elif isinstance(value, dict) and isinstance(into.get(name), dict):
            _deep_merge(into[name], value)  # e.g. a user layer sets one limit, inherits the rest
        else:
            into[name] = value


def merge(*layers: PolicySettings | None) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is not None:
            _deep_merge(merged, layer.model_dump(exclude_none=True))
    return merged


# Documents -------------------------------------------------------------------------------
class PolicyDocument(BaseModel):
    """A stored policy layer. `kind` says which: defaults, app, or user."""

    model_config = ConfigDict(extra="forbid")

    id: str
    app_id: str
    kind: Literal["defaults", "app", "user"]
    user_id: str | None = None
    name: str | None = Field(default=None, max_length=128)
    description: str | None = Field(default=None, max_length=1024)
    settings: PolicySettings = Field(default_factory=PolicySettings)
    updated_at: str | None = None
    updated_by: str | None = None
    etag: str | None = None

    def to_store(self) -> dict[str, Any]:
        return self.model_dump(exclude={"etag"}, exclude_none=False)


class PolicyInput(BaseModel):
    """What an admin sends to create or change a policy layer (PUT body, CLI)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=128)
    description: str | None = Field(default=None, max_length=1024)
    settings: PolicySettings = Field(default_factory=PolicySettings)


def check_id(value: str, what: str) -> str:
    import re

    if not isinstance(value, str) or not re.fullmatch(_ID_PATTERN, value):  # fullmatch: "$" would let a trailing newline in
        raise PolicyError(f"{what} {value!r} is not valid: 1-128 characters, letters, digits and ._:@- only")
    return value


class PolicyError(ValueError):
    """Invalid policy input; the message says which field and why."""


class PolicyConflict(PolicyError):
    """Input whose parts clash (names that must be unique repeat): answered 409, since JSON Schema
    cannot state uniqueness by a field and the document says it in words."""


def repeated(items: Any, field: str) -> list[str]:
    """Values of `field` that more than one item of a list has."""
    names = [item[field] for item in items if isinstance(item, dict) and isinstance(item.get(field), str)] if isinstance(items, list) else []
    return sorted({name for name in names if names.count(name) > 1})


@functools.lru_cache(maxsize=4096)
def user_doc_id(user_id: str) -> str:
    return "user:" + quote(user_id, safe="@.-_:")


def build_document(kind: str, app_id: str | None, user_id: str | None, data: dict[str, Any], actor: str | None) -> PolicyDocument:
    """Validate admin input into a document; raises PolicyError with a readable message."""
    settings = data.get("settings") if isinstance(data, dict) else None
    guards = settings.get("guards") if isinstance(settings, dict) else None
    duplicates = repeated(guards.get("rules"), "id") if isinstance(guards, dict) else []
    if duplicates:
        raise PolicyConflict(f"Guard rule ids must be unique within a layer: {duplicates}")
    payload = validate_admin_input(PolicyInput, data, "policy")
    if kind == "defaults":
        doc_id, partition = DEFAULTS_ID, DEFAULTS_PARTITION
    elif kind == "app":
        doc_id, partition = APP_DOC_ID, check_id(app_id, "app id")
    else:
        partition = check_id(app_id, "app id")
        doc_id = user_doc_id(check_id(user_id, "user id"))
    return PolicyDocument(
        id=doc_id, app_id=partition, kind=kind, user_id=user_id if kind == "user" else None,
        name=payload.name, description=payload.description, settings=payload.settings,
        updated_at=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        updated_by=actor,
    )


_JSON_TYPES = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer(),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool), "null": lambda v: v is None,
    "array": lambda v: isinstance(v, list), "object": lambda v: isinstance(v, dict),
}


def json_type_problems(schema: dict[str, Any], value: Any, where: str = "", defs: dict[str, Any] | None = None) -> list[str]:
    """Where `value` has a JSON type its model's schema does not allow.

    Pydantic's lax mode would take "5" or true for a number and "yes" for a boolean; its strict mode
    would refuse 5.0 for an integer, which JSON (and so the OpenAPI document) calls an integer. The
    admin API checks JSON types against the schema the document publishes, then lets pydantic
    check the rest (bounds, patterns, extra fields), so the two agree."""
    defs = schema.get("$defs", defs or {})
    if "$ref" in schema:
        return json_type_problems(defs[schema["$ref"].rsplit("/", 1)[1]], value, where, defs)
    if "anyOf" in schema:
        options = [json_type_problems(option, value, where, defs) for option in schema["anyOf"]]
        return [] if any(not found for found in options) else min(options, key=len)
    expected = schema.get("type")
    if expected is not None:
        kinds = expected if isinstance(expected, list) else [expected]
        if not any(_JSON_TYPES[kind](value) for kind in kinds):
            return [f"{where or 'body'}: must be {' or '.join(kinds)}"]
    if "const" in schema and value != schema["const"] or "enum" in schema and value not in schema["enum"]:
        return []  # pydantic says which values are allowed
    problems: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            sub = properties.get(name, extra if isinstance(extra, dict) else None)
            if sub is not None:
                problems += json_type_problems(sub, item, f"{where}.{name}" if where else name, defs)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            problems += json_type_problems(schema["items"], item, f"{where}[{index}]", defs)
    return problems


@functools.lru_cache(maxsize=None)
def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


def validate_admin_input(model: type[BaseModel], data: Any, what: str) -> Any:
    """`model` from an admin's JSON: JSON types as the published schema says, then the model."""
    problems = json_type_problems(_schema_of(model), data)
    if problems:
        raise PolicyError(f"Invalid {what}: " + "; ".join(problems[:10]))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(describe_validation_error(exc).replace("Invalid policy", f"Invalid {what}")) from None


def describe_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "body"
        problems.append(f"{where}: {error['msg']}")
    return "Invalid policy: " + "; ".join(problems)


def document_from_store(raw: dict[str, Any] | None) -> PolicyDocument | None:
    if raw is None:
        return None
    data = {k: v for k, v in raw.items() if k in PolicyDocument.model_fields}
    return PolicyDocument.model_validate(data, context={"stored": True})


def effective_policy(
    app_id: str,
    builtin: PolicySettings,
    defaults: PolicyDocument | None,
    app: PolicyDocument | None,
    user: PolicyDocument | None,
) -> EffectivePolicy:
    merged = merge(builtin, defaults.settings if defaults else None, app.settings if app else None, user.settings if user else None)
    guards = merged.get("guards") or {}
    return EffectivePolicy(
        app_id=app_id,
        app_name=app.name if app else None,
        registered=app is not None,
        owner=merged.get("owner"),
        contact=merged.get("contact"),
        cost_centre=merged.get("cost_centre"),
        enabled=merged["enabled"],
        allowed_deployments=tuple(merged["allowed_deployments"]),
        trust_user_header=merged["trust_user_header"],
        content_logging=merged["content_logging"],
        retention_days=merged["retention_days"],
        app_limits=Limits.model_validate(merged.get("app_limits") or {}),
        user_limits=Limits.model_validate(merged.get("user_limits") or {}),
        alert_thresholds=thresholds_of(merged.get("budget_alerts")),
        default_completion_tokens=merged["default_completion_tokens"],
        quota_on_store_failure=merged["quota_on_store_failure"],
        system_prompt=SystemPrompt.model_validate(merged["system_prompt"]) if merged.get("system_prompt") else None,
        guard_rules=tuple(GuardRule.model_validate(r, context={"stored": True}) for r in guards.get("rules") or ()),
        output_action=guards.get("output_action") or "block",
        redaction=guards.get("redaction") or "[redacted]",
        leak_protection=LeakProtection.model_validate(guards.get("leak_protection") or {}),
        fold_kana=guards.get("fold_kana") is not False,
        fold_confusables=guards.get("fold_confusables") is not False,
        cache=CacheSettings.model_validate(merged.get("cache") or {}),
        retry=RetrySettings.model_validate(merged.get("retry") or {}),
        async_jobs=AsyncJobSettings.model_validate(merged.get("async_jobs") or {}),
        gateway_keys_enabled=bool((merged.get("gateway_keys") or {}).get("enabled")),
        content_safety=SafetyPolicy.of(merged.get("content_safety")),
        personal_data=PersonalDataPolicy.of(merged.get("personal_data")),
    )
