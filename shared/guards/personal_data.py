"""Personal data in prompts and answers: found, and kept out of the log and the cache, or out of
the model's reach altogether. Per app (`personal_data.mode`), off by default:

- `mask_in_log`: the model gets the request as sent; the request log never holds the personal
  data (masked in the prompt, the parameters and the answer as `[MY_NUMBER]`, `[EMAIL]` …), and
  neither does the cache (a request or an answer holding any is not cached).
- `mask_upstream`: the model gets placeholders instead (`[MY_NUMBER_1]`, `[EMAIL_2]` …, the same
  value always the same placeholder within a request); the answer's placeholders are restored
  for the client, in whole answers and in streams (a placeholder split across chunks is held
  until it is whole). The log and the cache hold the placeholders, never the values, so two
  users' requests that differ only in their personal data share a cache entry, each restored
  with its own values.

What is found (`DETECTORS`; `register` adds a kind). Full-width digits and signs are read as
their ASCII forms, so `１２３４－５６７８` is found too:
- `my_number`: 12 digits (groups of 4 may be separated by a space or hyphen) whose check digit
  is right (python-stdnum's jp.in_): an order number of 12 digits is not masked;
- `corporate_number`: 13 digits with the right leading check digit (jp.cn), also after the
  `T` of a qualified invoice issuer number;
- `payment_card`: 13 to 19 digits, optionally grouped, starting 2–6, passing the Luhn check;
- `phone_jp`: Japanese numbers, 0 + 9 digits (fixed lines) or 0[5789]0 + 8 digits (IP, mobile),
  with or without hyphens or spaces, also as +81 without the 0;
- `postal_code_jp`: 〒 and 7 digits, or 3 digits, a hyphen and 4 digits;
- `email`: addresses.
Not found: names, street addresses, dates of birth, passport, driver's licence and bank account
numbers (no check digit tells them from other numbers), and personal data inside images or
audio. A person's name is the main gap: it needs a language model (Azure AI Language's PII
detection), not patterns.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator
from stdnum import luhn
from stdnum.jp import cn as corporate_number
from stdnum.jp import in_ as individual_number

from .. import sse
from ..context import RequestContext, UpstreamResult
from ..field_paths import replace
from ..operations import PERSONAL_DATA
from ..pipeline import Stage
from .output_guard import append_text

# Full-width ASCII (！ to ～) and the dashes people type read as ASCII, one character for one, so
# that positions in the read text are positions in the original.
_AS_ASCII = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)}
_AS_ASCII.update({ord(c): ord("-") for c in "‐‑‒–—―−ー"})
_AS_ASCII[0x3000] = ord(" ")


def _digits(text: str) -> str:
    return re.sub(r"[^0-9]", "", text)


def _phone(text: str) -> bool:
    digits = _digits(text)
    if text.lstrip().startswith("+81"):
        digits = "0" + digits[2:]
    if len(digits) == 11:
        return digits[:3] in ("050", "070", "080", "090")
    return len(digits) == 10 and digits[1] != "0"


@dataclass(frozen=True)
class Detector:
    kind: str
    pattern: re.Pattern[str]
    valid: Callable[[str], bool] = lambda text: True


DETECTORS: dict[str, Detector] = {}


def register(kind: str, pattern: str, valid: Callable[[str], bool] | None = None) -> None:
    """Add a kind of personal data: a pattern (over text with full-width characters read as
    ASCII) and, where the format has one, a check that tells real values from look-alikes."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", kind):
        raise ValueError("a kind is lowercase letters, digits and underscores")
    DETECTORS[kind] = Detector(kind, re.compile(pattern), valid or (lambda text: True))


# Longer digit runs (card numbers) are found first (_PRIORITY); a 12-digit value inside a longer
# grouped number that is not a card is masked too: too much rather than too little.
register("my_number", r"(?<![0-9])[0-9]{4}[ -]?[0-9]{4}[ -]?[0-9]{4}(?![0-9])",
         lambda text: individual_number.is_valid(_digits(text)))
register("corporate_number", r"(?<![0-9])T?[1-9][0-9]{12}(?![0-9])",
         lambda text: corporate_number.is_valid(_digits(text)))
register("payment_card", r"(?<![0-9])[2-6](?:[ -]?[0-9]){12,18}(?![0-9])",
         lambda text: 13 <= len(_digits(text)) <= 19 and luhn.is_valid(_digits(text)))
register("phone_jp", r"(?<![0-9+])(?:\+81[ -]?|0)[0-9]{1,4}(?:[ -]?[0-9]{1,4}){1,2}[ -]?[0-9]{4}(?![0-9])", _phone)
register("postal_code_jp", r"〒\s?[0-9]{3}-?[0-9]{4}(?![0-9])|(?<![0-9-])[0-9]{3}-[0-9]{4}(?![0-9-])")
register("email", r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}(?![A-Za-z0-9-])")

# The order in which overlapping finds are settled: the more specific format wins.
_PRIORITY = ("payment_card", "corporate_number", "my_number", "email", "phone_jp", "postal_code_jp")


@dataclass(frozen=True)
class Found:
    kind: str
    start: int
    end: int


def find(text: str, kinds: tuple[str, ...]) -> list[Found]:
    """The personal data in `text`, in order, overlaps settled by `_PRIORITY`."""
    if not text:
        return []
    read = text.translate(_AS_ASCII)
    found: list[Found] = []
    order = [k for k in _PRIORITY if k in kinds] + [k for k in kinds if k not in _PRIORITY]
    taken: list[tuple[int, int]] = []
    for kind in order:
        detector = DETECTORS.get(kind)
        if detector is None:
            continue
        for match in detector.pattern.finditer(read):
            start, end = match.span()
            if any(start < e and s < end for s, e in taken) or not detector.valid(match.group()):
                continue
            taken.append((start, end))
            found.append(Found(kind, start, end))
    return sorted(found, key=lambda f: f.start)


# Policy -------------------------------------------------------------------------------------------
class PersonalDataSettings(BaseModel):
    """Personal data in prompts and answers (guards/personal_data.py). Off by default."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["off", "mask_in_log", "mask_upstream"] | None = Field(
        default=None, description="off; mask_in_log (the log and the cache never hold it); mask_upstream (the model gets placeholders, the client the values).")
    kinds: list[str] | None = Field(default=None, description="What to find (default: every kind).",
                                    # The schema names the kinds registered when it is generated (the built-in ones).
                                    json_schema_extra=lambda schema: schema["anyOf"][0].__setitem__("items", {"enum": sorted(DETECTORS)}))

    @field_validator("kinds")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        unknown = sorted(set(value or ()) - set(DETECTORS))
        if unknown:
            raise ValueError(f"unknown kinds {unknown}; known: {sorted(DETECTORS)}")
        return value


@dataclass(frozen=True)
class PersonalDataPolicy:
    mode: str = "off"
    kinds: tuple[str, ...] = field(default_factory=lambda: tuple(DETECTORS))

    @classmethod
    def of(cls, merged: dict[str, Any] | None) -> "PersonalDataPolicy":
        merged = merged or {}
        return cls(mode=merged.get("mode") or "off", kinds=tuple(merged.get("kinds") or DETECTORS))


@dataclass(frozen=True)
class InLog(PersonalDataPolicy):
    """mask_in_log for a request that held personal data: what was found, by kind."""

    found: dict[str, int] = field(default_factory=dict)


def _counts(kinds) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    return counts


# Masking -------------------------------------------------------------------------------------------
def mask_text(text: str, kinds: tuple[str, ...]) -> str:
    """Each value replaced by its kind (`[MY_NUMBER]`): for what is kept, the log."""
    found = find(text, kinds)
    if not found:
        return text
    out, position = [], 0
    for item in found:
        out += [text[position:item.start], f"[{item.kind.upper()}]"]
        position = item.end
    out.append(text[position:])
    return "".join(out)


def mask_values(value: Any, kinds: tuple[str, ...]) -> Any:
    """Every string inside a JSON value masked (mask_text)."""
    if isinstance(value, str):
        return mask_text(value, kinds)
    if isinstance(value, list):
        return [mask_values(v, kinds) for v in value]
    if isinstance(value, dict):
        return {k: mask_values(v, kinds) for k, v in value.items()}
    return value


class Placeholders:
    """A request's values and their placeholders (mask_upstream): `[KIND_n]`, numbered per request."""

    PATTERN = re.compile(r"\[([A-Z][A-Z_]{1,31})_([0-9]{1,4})\]")

    def __init__(self) -> None:
        self.by_value: dict[str, str] = {}
        self.values: dict[str, str] = {}

    def mask(self, text: str, kinds: tuple[str, ...]) -> str:
        found = find(text, kinds)
        if not found:
            return text
        out, position = [], 0
        for item in found:
            value = text[item.start:item.end]
            placeholder = self.by_value.get(value)
            if placeholder is None:
                placeholder = f"[{item.kind.upper()}_{len(self.values) + 1}]"
                self.by_value[value], self.values[placeholder] = placeholder, value
            out += [text[position:item.start], placeholder]
            position = item.end
        out.append(text[position:])
        return "".join(out)

    def restore(self, text: str) -> str:
        if "[" not in text:
            return text
        return self.PATTERN.sub(lambda m: self.values.get(m.group(0), m.group(0)), text)


class RestoringChannel:
    """One streamed field: placeholders restored as the text arrives; a tail that could still be
    the start of a placeholder is held until it is whole or cannot be one."""

    _OPEN = re.compile(r"\[[A-Z_]{0,32}[0-9]{0,4}$")

    def __init__(self, placeholders: Placeholders) -> None:
        self._placeholders = placeholders
        self._held = ""

    def feed(self, piece: str) -> str:
        text = self._held + piece
        cut = text.rfind("[")
        if cut >= 0 and self._OPEN.fullmatch(text, cut):
            text, self._held = text[:cut], text[cut:]
        else:
            self._held = ""
        return self._placeholders.restore(text)

    def flush(self) -> str:
        text, self._held = self._held, ""
        return self._placeholders.restore(text)


class MaskPersonalData(Stage):
    name = PERSONAL_DATA

    async def before(self, ctx: RequestContext) -> None:
        policy = ctx.policy.personal_data
        if policy.mode == "off" or ctx.body is None:
            return
        operation = ctx.route.operation
        # An upload (audio, images) goes upstream as sent, never re-encoded: its text fields
        # cannot be masked there, so they are kept out of the log and the cache instead.
        if policy.mode == "mask_in_log" or operation.body != "json":
            ctx.personal_data = PersonalDataPolicy("mask_in_log", policy.kinds)
            found = [f for text in operation.reads.texts(ctx.body) for f in find(text, policy.kinds)]
            if found:
                ctx.keep_out_of_cache = True
                ctx.personal_data = InLog("mask_in_log", policy.kinds, _counts(f.kind for f in found))
            return
        placeholders = Placeholders()
        for location in operation.reads.locations(ctx.body):
            masked = placeholders.mask(location.text, policy.kinds)
            if masked != location.text:
                replace(location, masked)
        if placeholders.values:
            ctx.body_modified = True
            ctx.personal_data = placeholders

    def record(self, ctx: RequestContext) -> dict[str, Any]:
        """What was found in the request, by kind (never the values)."""
        kept = ctx.personal_data
        if isinstance(kept, Placeholders):
            return {"personal_data": {"mode": "mask_upstream", "found": _counts(p[1:].rsplit("_", 1)[0].lower() for p in kept.values)}}
        if isinstance(kept, InLog):
            return {"personal_data": {"mode": "mask_in_log", "found": kept.found}}
        return {}

    def after(self, ctx: RequestContext, result: UpstreamResult) -> UpstreamResult:
        placeholders = ctx.personal_data
        if not isinstance(placeholders, Placeholders) or result.status != 200:
            return result
        if result.is_stream:
            result.events = self._restore_stream(ctx, placeholders, result.events)
        elif isinstance(result.json, dict):
            result.reviews.append(self._restore_whole)  # after Content Safety's review: it sees placeholders
        return result

    async def _restore_whole(self, ctx: RequestContext, result: UpstreamResult) -> UpstreamResult:
        placeholders, writes = ctx.personal_data, ctx.route.operation.writes
        body = result.json
        if not any(placeholders.restore(text) != text for text in writes.texts(body)):
            return result
        restored = copy.deepcopy(body)
        for location in writes.locations(restored):
            replace(location, placeholders.restore(location.text))
        if ctx.model_response is None:
            ctx.model_response = body  # the log and the cache keep the placeholders
        result.json, result.body = restored, orjson.dumps(restored)
        return result

    async def _restore_stream(self, ctx: RequestContext, placeholders: Placeholders,
                              events: AsyncIterator[sse.Event]) -> AsyncIterator[sse.Event]:
        operation = ctx.route.operation
        channels: dict[tuple, RestoringChannel] = {}
        try:
            async for event in events:
                payload = event.payload
                if not isinstance(payload, dict):
                    yield event
                    continue
                if operation.stream_shape == "response_events":
                    for out in _restore_response_event(event, payload, placeholders, channels, operation.stream_events):
                        yield out
                    continue
                changed = False
                for location in operation.stream_writes.locations(payload):
                    key = (location.path, location.indexes)
                    channel = channels.setdefault(key, RestoringChannel(placeholders))
                    text = channel.feed(location.text)
                    if text != location.text:
                        replace(location, text)
                        changed = True
                for position, choice in enumerate(payload.get("choices") or ()):
                    if isinstance(choice, dict) and choice.get("finish_reason"):
                        index = choice.get("index", position)
                        for (path, indexes), channel in channels.items():
                            rest = channel.flush() if indexes[0] == index else ""
                            if rest:  # what was held goes out with the choice's finishing chunk
                                append_text(choice, path, indexes[1:], rest)
                                changed = True
                if changed:
                    event.changed(payload)
                yield event
        finally:
            await sse.close(events)


def _restore_response_event(event: sse.Event, payload: dict[str, Any], placeholders: Placeholders,
                            channels: dict[tuple, RestoringChannel], fields: dict[str, str]) -> list[sse.Event]:
    """A Responses stream event with its placeholders restored: deltas through their field's
    channel (a held tail goes out as one more delta before the field's `.done`), every other
    event (`.done`, items, the response object) whole."""
    kind = payload.get("type") or ""
    field_name = fields.get(kind)
    out = []
    if field_name is not None:
        key = (field_name, payload.get("output_index", 0), payload.get("content_index", payload.get("summary_index", 0)))
        channel = channels.setdefault(key, RestoringChannel(placeholders))
        if kind.endswith(".delta"):
            text = channel.feed(payload.get("delta") or "")
            if text != payload.get("delta"):
                if not text:
                    return []
                event.changed({**payload, "delta": text})
            return [event]
        rest = channel.flush()
        if rest:
            delta_kind = kind[: -len(".done")] + ".delta"
            out.append(sse.Event.of({**payload, "type": delta_kind, "delta": rest}, delta_kind))
    restored = _restore_json(payload, placeholders)
    if restored != payload:
        event.changed(restored)
    return out + [event]


def _restore_json(value: Any, placeholders: Placeholders) -> Any:
    if isinstance(value, str):
        return placeholders.restore(value)
    if isinstance(value, list):
        return [_restore_json(v, placeholders) for v in value]
    if isinstance(value, dict):
        return {k: _restore_json(v, placeholders) for k, v in value.items()}
    return value
