"""Loops with lists in real serving code (FastDeploy's chunked MoE), end to end. Known to fail
today; strict xfail, so the day it passes the marker must go and the goal be claimed."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from graphopt.driver import optimize
from tests.conftest import compose_cfg


@pytest.mark.xfail(strict=True, raises=ValueError, reason=(
    "two problems, found 2026-12-03: (1) the traced program has static token shapes (the trace "
    "batch's 5 tokens in every pd_op.data), so other token counts cannot run; (2) the hoist "
    "pass copies the loop into the host prologue and the hoisted first loop condition comes "
    "out False for 7 tokens (2 chunks): the kept-together loop segment runs 0 iterations and "
    "concatenating the empty list fails in check_numerics. piecewise-split itself now keeps "
    "the list with its loop (tests/test_piecewise_split.py)"))
def test_a_chunked_moe_with_a_list_verifies_through_the_flagship_pipeline(tmp_path):
    cfg = compose_cfg("pipeline=cudagraph", "verify.steps=6")
    cfg.model = OmegaConf.create({"_target_": "tests.chunked_models.build", "name": "chunked",
                                  "form": "seed"})
    report = optimize(cfg, run_dir=tmp_path)
    assert report["verified"] and report["hazards"]["after"] == 0
    assert report["replay"]["mismatches"] == 0
