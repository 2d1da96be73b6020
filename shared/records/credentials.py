"""Credentials inside requests: found, and kept out of everything the gateway stores.

Azure's "On Your Data" (`data_sources`) and similar extensions carry the credentials of the data
source in the request body: an `authentication` object (api key, connection string, access
token, username and password, …) and sometimes other members named like a secret. The upstream
needs them, so they are relayed unchanged; but the request log, async job documents and cache
entries must never hold them. Which request fields can carry them is the operations table's
`credential_roots`; below those, every member of an `authentication` object but its `type`, and
every member named like a key, secret, password, token or connection string, is replaced by
`MARKER` in what is stored.
"""
from __future__ import annotations

import re
from typing import Any

from ..operations import Operation

MARKER = "[credential removed]"
_SECRET_NAME = re.compile(
    r"(?:^|[_\-.])(?:api[_\-]?key|key|keys|secret|secrets|password|passwd|pwd|token|tokens|connection[_\-]?string|credentials?|sas)(?:$|[_\-.])"
    r"|(?:apikey|accesstoken|connectionstring|clientsecret)",
    re.IGNORECASE,
)


def _masked(value: Any, inside_authentication: bool = False) -> tuple[Any, bool]:
    """`value` with credentials replaced, and whether anything was (a copy only then)."""
    if isinstance(value, list):
        items = [_masked(item) for item in value]
        if any(changed for _, changed in items):
            return [item for item, _ in items], True
        return value, False
    if not isinstance(value, dict):
        return value, False
    out, changed = {}, False
    for name, member in value.items():
        if (inside_authentication and name != "type") or (isinstance(name, str) and _SECRET_NAME.search(name)):
            if member is not None:
                out[name], changed = MARKER, True
                continue
        masked, member_changed = _masked(member, inside_authentication=name == "authentication" and isinstance(member, dict))
        out[name] = masked
        changed = changed or member_changed
    return (out, True) if changed else (value, False)


def without_credentials(operation: Operation, body: dict[str, Any]) -> dict[str, Any]:
    """The body to store: the same object when it carries no credentials, else a masked copy."""
    if not operation.credential_roots or not isinstance(body, dict):
        return body
    masked = None
    for root in operation.credential_roots:
        if root in body:
            value, changed = _masked(body[root])
            if changed:
                masked = masked or dict(body)
                masked[root] = value
    return masked if masked is not None else body


def carries_credentials(operation: Operation, body: dict[str, Any]) -> bool:
    return without_credentials(operation, body) is not body
