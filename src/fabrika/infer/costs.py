"""What API requests cost: the one price list and the one estimator, for the client's accounting of each
answer, the Batch API's, and every stage's plan (`--dry-run`), so a price changes in one place."""

from __future__ import annotations

from typing import Literal, NamedTuple

# $ per 1M tokens (input, output): OpenAI list prices as of 2026-11; override with `prices` in config.
DEFAULT_PRICES = {"gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6), "gpt-4.1": (2.0, 8.0),
                  "gpt-4.1-mini": (0.4, 1.6), "gpt-4-turbo": (10.0, 30.0), "gpt-3.5-turbo": (0.5, 1.5)}
BATCH_DISCOUNT = 0.5  # OpenAI bills batch requests at half the online price


class ApiCost(NamedTuple):
    usd: float
    known: bool  # a price was found; a local model (None) or an unlisted one is counted as free


def api_cost(model: str | None, prompt_tokens: float, completion_tokens: float, requests: float = 1,
             prices: dict[str, tuple[float, float]] | None = None,
             mode: Literal["online", "batch"] = "online") -> ApiCost:
    """Dollars for `requests` requests to the API model `model` (None: a local one) of `prompt_tokens` in and
    `completion_tokens` out each (or, with one request, the tokens of many together: the price is linear),
    at the `prices` given for it, else the list price, and at the batch price in `batch` mode."""
    price = ((prices or {}).get(model) or DEFAULT_PRICES.get(model)) if model is not None else None
    if price is None:
        return ApiCost(0.0, False)
    p_in, p_out = price
    usd = requests * (prompt_tokens * p_in + completion_tokens * p_out) / 1e6
    return ApiCost(usd * BATCH_DISCOUNT if mode == "batch" else usd, True)
