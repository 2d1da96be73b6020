"""What each Azure OpenAI api-version accepts, where the gateway adds to a request.

Azure OpenAI checks request fields against the api-version: a field a version does not know is
refused with 400 "Unrecognized request argument supplied". The gateway adds one field of its own,
`stream_options.include_usage` (so that a stream's cost is exact), and Azure accepts it from
2024-09-01-preview and from the GA version 2024-10-21 on; an app pinned to an older version must
keep streaming behind the gateway, so there the gateway adds nothing and counts the tokens
itself. The v1 API (`/openai/v1/…`, api-version absent, `preview`, `latest` or `v1`) accepts it.
"""
from __future__ import annotations

import re
from datetime import date

_DATED = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(-preview)?$")
_V1_VALUES = {"v1", "preview", "latest"}

# Field → (first preview version, first GA version) that accept it.
FIRST_ACCEPTED: dict[str, tuple[date, date]] = {
    "stream_options": (date(2024, 9, 1), date(2024, 10, 21)),
}


def accepts(api_version: str | None, field: str) -> bool:
    """Whether an upstream call at `api_version` (None: a v1 route, which sends none) accepts
    `field`. An unknown version is assumed not to: adding nothing never breaks a request."""
    if api_version is None or api_version.strip().lower() in _V1_VALUES:
        return True
    match = _DATED.match(api_version.strip().lower())
    if match is None:
        return False
    try:
        version = date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:
        return False
    first_preview, first_ga = FIRST_ACCEPTED[field]
    return version >= (first_preview if match.group(4) else first_ga)
