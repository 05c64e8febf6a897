"""Checks on report.json that cannot pass vacuously.

``all(v <= tol for v in report["numerics"].values())`` also passes on an empty dict, when no
batch kind was compared at all; these helpers require every kind first.
"""

from __future__ import annotations

from typing import Any

#: the batch kinds every numerics check compares (graphopt.models.base.BATCH_KINDS), spelled out
#: here so that a check that silently drops a kind fails
BATCH_KINDS = ("prefill", "decode", "mixed")


def assert_numerics_within(report: dict[str, Any], atol: float = 1e-5,
                           key: str = "numerics") -> None:
    """``report[key]`` compared every batch kind with eager, each within `atol` (NaN fails)."""
    errors = report[key]
    assert sorted(errors) == sorted(BATCH_KINDS), (
        f"report[{key!r}] compared {sorted(errors)}, expected every batch kind "
        f"{list(BATCH_KINDS)}")
    bad = {k: v for k, v in errors.items() if not v <= atol}
    assert not bad, f"report[{key!r}]: max abs err over {atol:g} on {bad}"
