"""The one price table: arithmetic per provider, sources recorded, unknowns stay unknown."""

from __future__ import annotations

import pytest

from avatar_core.errors import InputError
from avatar_core.media.pricing import PRICE_TABLE, estimate_cost, saving
from avatar_core.providers.base import MODEL_IDS


@pytest.mark.parametrize(
    "tier, seconds, usd",
    [
        ("standard", 5.0, 0.25),  # exactly one block
        ("standard", 5.01, 0.50),  # a started block is billed in full (our stated assumption)
        ("standard", 0.5, 0.25),
        ("standard", 300.0, 15.00),
        ("pro", 12.0, 1.50),
    ],
)
def test_wavespeed_bills_per_started_5s_block(tier, seconds, usd):
    est = estimate_cost("wavespeed", tier, "v1", seconds)
    assert est.usd == pytest.approx(usd)
    assert "block" in est.basis and "5 s" in est.basis
    assert "assumes" in est.basis  # the assumption is visible to the user


def test_segmind_is_per_generation_whatever_the_length():
    assert estimate_cost("segmind", "standard", "v1", 3).usd == pytest.approx(2.28)
    assert estimate_cost("segmind", "standard", "v1", 290).usd == pytest.approx(2.28)
    assert estimate_cost("segmind", "pro", "v1", 10).usd == pytest.approx(4.48)
    assert "per video" in estimate_cost("segmind", "pro", "v1", 10).basis


def test_per_second_prices():
    assert estimate_cost("fal", "standard", "v1", 10).usd == pytest.approx(0.562)
    assert estimate_cost("fal", "pro", "v1", 10).usd == pytest.approx(1.15)
    assert estimate_cost("replicate", "standard", "v2", 10).usd == pytest.approx(0.56)
    assert estimate_cost("replicate", "pro", "v2", 10).usd == pytest.approx(1.10)
    basis = estimate_cost("fal", "standard", "v1", 10).basis
    assert "$0.0562/s" in basis  # published price shown unrounded


def test_kling_price_is_unknown_not_guessed():
    est = estimate_cost("kling", "standard", "v1", 10)
    assert est.usd is None
    assert "unknown" in est.basis and "Kling" in est.basis


def test_local_is_free():
    est = estimate_cost("local", "pro", "v1", 120)
    assert est.usd == 0.0
    assert "free" in est.basis


def test_every_row_records_source_and_date():
    for key, price in PRICE_TABLE.items():
        assert price.source, key
        assert price.as_of, key
        est = estimate_cost(*key, 10)
        assert price.as_of in est.source


def test_every_model_in_the_provider_table_has_a_price_row():
    # MODEL_IDS (providers/base.py) is the list of what can be submitted; a missing price
    # row would make a job's cost estimate crash.
    assert set(MODEL_IDS) <= set(PRICE_TABLE)


def test_unknown_choices_raise_input_error_with_what_exists():
    with pytest.raises(InputError, match="does not offer model version v1; it has v2"):
        estimate_cost("replicate", "standard", "v1", 10)
    with pytest.raises(InputError, match="Unknown provider"):
        estimate_cost("nope", "standard", "v1", 10)
    with pytest.raises(InputError, match="Unknown tier"):
        estimate_cost("fal", "ultra", "v1", 10)
    with pytest.raises(InputError):
        estimate_cost("fal", "standard", "v1", -1)


def test_saving_from_trimming():
    assert saving("wavespeed", "standard", "v1", 7.0, 3.5) == pytest.approx(0.25)
    assert saving("wavespeed", "standard", "v1", 4.0, 3.0) == 0.0  # same block
    assert saving("fal", "standard", "v1", 10, 5) == pytest.approx(0.281)
    assert saving("kling", "standard", "v1", 10, 5) is None
