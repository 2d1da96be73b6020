"""The gateway's HTTP routes, from the operations table: used by function_app.py, the gateway and
the local host.

Route templates use the Azure Functions syntax (`{name}` segments); `host.json` sets the route
prefix to "" so these paths are the public URLs, as the openai SDK expects them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .operations import OPERATIONS, Operation, Style


@dataclass(frozen=True)
class ModelRoute:
    function_name: str
    template: str
    operation: Operation
    style: Style
    methods: tuple[str, ...] = ("POST",)
    # One function may serve several operations on one path, told apart by method (files: GET
    # lists, POST uploads): each method's own route.
    by_method: tuple[tuple[str, "ModelRoute"], ...] = ()

    @property
    def deployment_in_path(self) -> bool:
        return "{deployment}" in self.template

    def for_method(self, method: str) -> "ModelRoute":
        for name, route in self.by_method:
            if name == method:
                return route
        return self


def _model_routes() -> tuple[ModelRoute, ...]:
    """Every route of every operation in the table, in the table's order; operations sharing a
    function (one path, different methods) are served by one route."""
    grouped: dict[str, list[ModelRoute]] = {}
    for operation in OPERATIONS:
        for spec in operation.routes:
            grouped.setdefault(spec.function_name, []).append(ModelRoute(spec.function_name, spec.template, operation, spec.style, spec.methods))
    routes = []
    for parts in grouped.values():
        if len(parts) == 1:
            routes.append(parts[0])
            continue
        first = parts[0]
        if any(p.template != first.template or p.style is not first.style for p in parts):
            raise ValueError(f"function {first.function_name}: operations sharing it must share its path")
        methods = tuple(m for p in parts for m in p.methods)
        if len(set(methods)) != len(methods):
            raise ValueError(f"function {first.function_name}: two operations claim one method")
        routes.append(ModelRoute(first.function_name, first.template, first.operation, first.style, methods,
                                 tuple((m, p) for p in parts for m in p.methods)))
    return tuple(routes)


MODEL_ROUTES: tuple[ModelRoute, ...] = _model_routes()

ROUTES_BY_FUNCTION = {r.function_name: r for r in MODEL_ROUTES}
HEALTH_ROUTE = "health"

# Admin routes. The Functions host reserves routes starting with "admin" (and "runtime") for
# its own APIs and refuses to index functions that use them, hence the product prefix.
ADMIN_PREFIX = "sekisho/admin"


@lru_cache(maxsize=256)
def compile_template(template: str) -> re.Pattern[str]:
    """Azure Functions route template → regex. `{name}` matches one path segment,
    `{*name}` the rest of the path; constraints like `{id:int}` are matched as a plain segment."""
    parts = []
    for segment in template.strip("/").split("/"):
        match = re.fullmatch(r"\{(\*?)([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\??\}", segment)
        if match is None:
            parts.append(re.escape(segment))
        elif match.group(1):
            parts.append(f"(?P<{match.group(2)}>.*)")
        else:
            parts.append(f"(?P<{match.group(2)}>[^/]+)")
    return re.compile("/".join(parts), re.IGNORECASE)


def match_template(template: str, path: str) -> dict[str, str] | None:
    """Route parameters of `path` under `template`, or None when the path does not match."""
    match = compile_template(template).fullmatch(path.strip("/"))
    if match is None:
        return None
    return match.groupdict()  # `path` is decoded already (ASGI scope path): never decode twice
