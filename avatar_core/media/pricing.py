"""What a job will cost, from ONE price table that says where each price came from.

Prices follow the output duration, which equals the audio duration, so the estimate
takes the (possibly trimmed) audio length in seconds. Every price records its source
and the date it was read; a price nobody has published is ``None`` with a note, never
a guess dressed up as a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal
from collections.abc import Mapping

from ..errors import InputError

# Where the prices below come from and when they were read (see /work/shared/PROVIDERS.md,
# gathered from the providers' public pricing/API pages, November 2026).
PRICES_AS_OF = "2026-11"
_SRC_WAVESPEED = "WaveSpeed AI model pages (kwaivgi/kling-v1-ai-avatar-*)"
_SRC_SEGMIND = "Segmind model pages (kling-*-ai-avatar), published average per generation"
_SRC_FAL = "fal.ai model pages (fal-ai/kling-video/*/ai-avatar)"
_SRC_REPLICATE = "Replicate model page kwaivgi/kling-avatar-v2"
_SRC_KLING = "Kling API: no public per-second price for avatar jobs (resource packs)"
_SRC_LOCAL = "runs on this machine"

# WaveSpeed publishes "$0.25 per 5 s of output". ASSUMPTION (unconfirmed): a started 5 s
# block is billed in full, as is usual for per-block pricing, so 6 s costs two blocks.
# Kept in this one constant so it is easy to change if WaveSpeed says otherwise.
WAVESPEED_BLOCK_S = 5.0

PriceKind = Literal["per_block", "per_second", "per_generation", "free", "unknown"]


@dataclass(frozen=True)
class Price:
    """One row of the price table.

    ``kind`` says how ``usd`` applies: per started block of ``block_s`` seconds, per
    output second, per generation (any length), free, or unknown (``usd`` is None).
    """

    kind: PriceKind
    usd: float | None
    source: str
    as_of: str = PRICES_AS_OF
    block_s: float | None = None
    note: str = ""


@dataclass(frozen=True)
class CostEstimate:
    """An estimate for one job. ``usd`` is None when no price is known.

    ``basis`` explains the arithmetic in words a user can check ("2 blocks of 5 s x $0.25").
    ``source`` says where the price came from and when it was read.
    """

    usd: float | None
    basis: str
    source: str


# (provider, tier, version) -> Price. The one price table.
PRICE_TABLE: Mapping[tuple[str, str, str], Price] = {
    ("wavespeed", "standard", "v1"): Price("per_block", 0.25, _SRC_WAVESPEED, block_s=WAVESPEED_BLOCK_S),
    ("wavespeed", "pro", "v1"): Price("per_block", 0.50, _SRC_WAVESPEED, block_s=WAVESPEED_BLOCK_S),
    ("wavespeed", "standard", "v2"): Price(
        "unknown", None, _SRC_WAVESPEED, note="WaveSpeed has not published a v2 price; check its model page."
    ),
    ("wavespeed", "pro", "v2"): Price(
        "unknown", None, _SRC_WAVESPEED, note="WaveSpeed has not published a v2 price; check its model page."
    ),
    ("segmind", "standard", "v1"): Price(
        "per_generation", 2.28, _SRC_SEGMIND, note="published average; the real charge depends on GPU time"
    ),
    ("segmind", "pro", "v1"): Price(
        "per_generation", 4.48, _SRC_SEGMIND, note="published average; the real charge depends on GPU time"
    ),
    ("segmind", "standard", "v2"): Price(
        "unknown", None, _SRC_SEGMIND, note="Segmind has not published a v2 average; check its model page."
    ),
    ("segmind", "pro", "v2"): Price(
        "unknown", None, _SRC_SEGMIND, note="Segmind has not published a v2 average; check its model page."
    ),
    ("fal", "standard", "v1"): Price("per_second", 0.0562, _SRC_FAL),
    ("fal", "pro", "v1"): Price("per_second", 0.115, _SRC_FAL, note="pro price unconfirmed"),
    ("fal", "standard", "v2"): Price(
        "unknown", None, _SRC_FAL, note="fal.ai has not published a v2 price here; check its model page."
    ),
    ("fal", "pro", "v2"): Price(
        "unknown", None, _SRC_FAL, note="fal.ai has not published a v2 price here; check its model page."
    ),
    ("replicate", "standard", "v2"): Price("per_second", 0.056, _SRC_REPLICATE),
    ("replicate", "pro", "v2"): Price("per_second", 0.11, _SRC_REPLICATE),
    ("kling", "standard", "v1"): Price(
        "unknown", None, _SRC_KLING, note="Kling bills from prepaid resource packs; see your Kling console."
    ),
    ("kling", "pro", "v1"): Price(
        "unknown", None, _SRC_KLING, note="Kling bills from prepaid resource packs; see your Kling console."
    ),
    ("local", "standard", "v1"): Price("free", 0.0, _SRC_LOCAL),
    ("local", "pro", "v1"): Price("free", 0.0, _SRC_LOCAL),
}


def price_for(provider: str, tier: str, version: str = "v1") -> Price:
    """The table row for a provider/tier/version, or InputError naming what exists."""
    try:
        return PRICE_TABLE[(provider, tier, version)]
    except KeyError:
        providers = sorted({p for (p, _t, _v) in PRICE_TABLE})
        if provider not in providers:
            raise InputError(f"Unknown provider {provider!r}. Choose one of: {', '.join(providers)}.") from None
        if tier not in ("standard", "pro"):
            raise InputError(f"Unknown tier {tier!r}. Choose 'standard' or 'pro'.") from None
        have = sorted({v for (p, _t, v) in PRICE_TABLE if p == provider})
        raise InputError(
            f"{provider} does not offer model version {version}; it has {', '.join(have)}.", provider=provider
        ) from None


def _money(usd: float) -> str:
    """$0.25, $2.28, $0.0562, $0.115: at least two decimals, no rounding of published prices."""
    text = f"{usd:.4f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def estimate_cost(provider: str, tier: str, version: str, seconds: float) -> CostEstimate:
    """Estimated price of one job whose output lasts ``seconds`` (= the audio duration)."""
    if seconds < 0 or math.isnan(seconds):
        raise InputError("The audio duration must be a positive number of seconds.")
    p = price_for(provider, tier, version)
    source = f"{p.source} (as of {p.as_of})"
    note = f"; {p.note}" if p.note else ""
    if p.kind == "free":
        return CostEstimate(0.0, "free: rendered on this computer", source)
    if p.kind == "unknown" or p.usd is None:
        return CostEstimate(None, f"price unknown{note}", source)
    if p.kind == "per_generation":
        return CostEstimate(round(p.usd, 4), f"{_money(p.usd)} per video, any length{note}", source)
    if p.kind == "per_second":
        usd = round(p.usd * seconds, 4)
        return CostEstimate(usd, f"{seconds:.1f} s x {_money(p.usd)}/s{note}", source)
    # per_block: every started block is billed in full (see WAVESPEED_BLOCK_S).
    block = p.block_s or WAVESPEED_BLOCK_S
    blocks = max(1, math.ceil(round(seconds, 6) / block))
    usd = round(blocks * p.usd, 4)
    return CostEstimate(
        usd,
        f"{blocks} started block(s) of {block:g} s x {_money(p.usd)} for {seconds:.1f} s"
        f" (assumes each started block is billed in full){note}",
        source,
    )


def saving(provider: str, tier: str, version: str, before_s: float, after_s: float) -> float | None:
    """Money saved by shortening the audio from ``before_s`` to ``after_s`` (None if unknown)."""
    a = estimate_cost(provider, tier, version, before_s).usd
    b = estimate_cost(provider, tier, version, after_s).usd
    if a is None or b is None:
        return None
    return round(max(0.0, a - b), 4)
