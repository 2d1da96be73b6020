"""Prices per model and the cost of a request.

Prices are per 1M tokens in one currency (SEKISHO_CURRENCY), and for what is not priced by tokens:
per minute of audio (whisper-class transcription and translation), per 1M characters (speech),
per image by size and quality (image models whose answers carry no token usage); requests run in
a batch cost the standard price less the model's `batch_discount`. An answer that
reports tokens is priced by its tokens; one that does not, by its units. Built-in defaults cover the common
Azure OpenAI models (global standard list prices; check them against your agreement); admins
override or add models in the store, and those entries win. A model name matches the longest
priced name it starts with ("gpt-4o-mini-2024-07-18" → "gpt-4o-mini"); an unknown model is
charged at the `default` entry so that budgets never treat it as free.

Costs are integers in nano-units of the currency (1e-9), so that counters add up exactly.
"""
from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..usage import Usage

NANOS = 1_000_000_000
DEFAULT_KEY = "default"


class Price(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_per_1m: float = Field(ge=0)
    cached_input_per_1m: float | None = Field(default=None, ge=0)  # None: same as input
    output_per_1m: float = Field(default=0, ge=0)
    per_audio_minute: float | None = Field(default=None, ge=0, description="Transcription and translation priced by audio length (whisper).")
    per_1m_characters: float | None = Field(default=None, ge=0, description="Speech priced by the characters read aloud (tts).")
    per_image: dict[str, float] | None = Field(default=None, description='Per image, by "<size>/<quality>" (e.g. "1024x1024/standard"), with "default" for any other.')
    batch_discount: float = Field(default=0.5, ge=0, le=1, description="Share taken off the price of requests run in a batch (Azure's global batch: half price).")


BUILTIN_PRICES: dict[str, Price] = {
    "gpt-5": Price(input_per_1m=1.25, cached_input_per_1m=0.125, output_per_1m=10.0),
    "gpt-5-mini": Price(input_per_1m=0.25, cached_input_per_1m=0.025, output_per_1m=2.0),
    "gpt-5-nano": Price(input_per_1m=0.05, cached_input_per_1m=0.005, output_per_1m=0.40),
    "gpt-4.1": Price(input_per_1m=2.0, cached_input_per_1m=0.50, output_per_1m=8.0),
    "gpt-4.1-mini": Price(input_per_1m=0.40, cached_input_per_1m=0.10, output_per_1m=1.60),
    "gpt-4.1-nano": Price(input_per_1m=0.10, cached_input_per_1m=0.025, output_per_1m=0.40),
    "gpt-4o": Price(input_per_1m=2.50, cached_input_per_1m=1.25, output_per_1m=10.0),
    "gpt-4o-mini": Price(input_per_1m=0.15, cached_input_per_1m=0.075, output_per_1m=0.60),
    "o3": Price(input_per_1m=2.0, cached_input_per_1m=0.50, output_per_1m=8.0),
    "o3-mini": Price(input_per_1m=1.10, cached_input_per_1m=0.55, output_per_1m=4.40),
    "o4-mini": Price(input_per_1m=1.10, cached_input_per_1m=0.275, output_per_1m=4.40),
    # Audio and images (Azure list prices; units where the answer reports no tokens).
    "whisper": Price(input_per_1m=0, per_audio_minute=0.006),
    "gpt-4o-transcribe": Price(input_per_1m=2.50, output_per_1m=10.0, per_audio_minute=0.006),
    "gpt-4o-mini-transcribe": Price(input_per_1m=1.25, output_per_1m=5.0, per_audio_minute=0.003),
    "tts": Price(input_per_1m=0, per_1m_characters=15.0),
    "tts-hd": Price(input_per_1m=0, per_1m_characters=30.0),
    "gpt-4o-mini-tts": Price(input_per_1m=0.60, output_per_1m=12.0, per_1m_characters=15.0),
    "dall-e-3": Price(input_per_1m=0, per_image={"1024x1024/standard": 0.04, "1024x1792/standard": 0.08, "1792x1024/standard": 0.08,
                                                 "1024x1024/hd": 0.08, "1024x1792/hd": 0.12, "1792x1024/hd": 0.12, "default": 0.08}),
    "gpt-image-1": Price(input_per_1m=5.0, output_per_1m=40.0, per_image={"default": 0.19}),
    "text-embedding-3-small": Price(input_per_1m=0.02),
    "text-embedding-3-large": Price(input_per_1m=0.13),
    "text-embedding-ada-002": Price(input_per_1m=0.10),
    # An unknown model is never free, whatever it is priced by.
    DEFAULT_KEY: Price(input_per_1m=2.50, cached_input_per_1m=1.25, output_per_1m=10.0, per_audio_minute=0.006,
                       per_1m_characters=30.0, per_image={"default": 0.19}),
}


def cost_nanos(price: Price, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
    cached = min(cached_tokens, prompt_tokens)
    cached_rate = price.cached_input_per_1m if price.cached_input_per_1m is not None else price.input_per_1m
    per_million = (prompt_tokens - cached) * price.input_per_1m + cached * cached_rate + completion_tokens * price.output_per_1m
    return round(per_million * NANOS / 1_000_000)


def batch_cost(price: Price, cost: int) -> int:
    """The cost of a request run in a batch, from its cost at the standard price."""
    return round(cost * (1 - price.batch_discount))


def nanos_to_amount(nanos: int) -> float:
    return nanos / NANOS


def units_cost(price: Price, units: dict[str, float]) -> int:
    amount = 0.0
    for name, quantity in units.items():
        if name == "audio_seconds":
            amount += quantity / 60 * (price.per_audio_minute or 0.0)
        elif name == "characters":
            amount += quantity / 1_000_000 * (price.per_1m_characters or 0.0)
        elif name.startswith("images:") and price.per_image:
            kind = name[len("images:"):]
            amount += quantity * price.per_image.get(kind, price.per_image.get("default", 0.0))
    return round(amount * NANOS)


def usage_cost(price: Price, usage: Usage) -> int:
    """Tokens when the answer reported them, else the units it is priced by."""
    if usage.total_tokens or not usage.units:
        return cost_nanos(price, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
    return units_cost(price, usage.units)


class PricingTable:
    """Built-in prices overlaid with the store's, reloaded after `ttl_seconds`."""

    def __init__(self, store, ttl_seconds: float) -> None:
        self._store = store
        self._ttl = ttl_seconds
        self._loaded_at = float("-inf")
        self._prices: dict[str, Price] = dict(BUILTIN_PRICES)
        self._matched: dict[str | None, tuple[str, Price]] = {}  # model name → its price, for these prices

    async def prices(self) -> dict[str, Price]:
        if time.monotonic() - self._loaded_at > self._ttl:
            merged = dict(BUILTIN_PRICES)
            for doc in await self._store.list_prices():
                merged[doc["id"]] = Price.model_validate({k: doc[k] for k in Price.model_fields if k in doc})
            self._prices, self._matched = merged, {}
            self._loaded_at = time.monotonic()
        return self._prices

    def invalidate(self) -> None:
        self._loaded_at = float("-inf")

    async def price_for(self, model: str | None) -> tuple[str, Price]:
        prices = await self.prices()
        found = self._matched.get(model)
        if found is None:
            if len(self._matched) > 1000:  # model names come from answers: keep the memo small
                self._matched.clear()
            found = self._matched[model] = match_price(prices, model)
        return found


def match_price(prices: dict[str, Price], model: str | None) -> tuple[str, Price]:
    name = (model or "").lower()
    if name in prices:
        return name, prices[name]
    best = max((key for key in prices if key != DEFAULT_KEY and name.startswith(key)), key=len, default=None)
    if best is not None:
        return best, prices[best]
    return DEFAULT_KEY, prices[DEFAULT_KEY]


def price_documents(prices: dict[str, Price], overridden: set[str]) -> list[dict[str, Any]]:
    return [
        {"model": name, **price.model_dump(), "source": "store" if name in overridden else "builtin"}
        for name, price in sorted(prices.items())
    ]
