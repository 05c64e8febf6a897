"""Shared fixtures: one process-wide Paddle import, Hydra compose() exactly as users type."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("GLOG_minloglevel", "2")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLACKLIST_FLAG = "FLAGS_cuda_graph_blacklist"


@pytest.fixture(autouse=True)
def _empty_blacklist_flag():
    """Every test starts and ends with Paddle's CUDA-graph blacklist flag empty.

    cudagraph-blacklist-injection merges into the flag's current value (a user's own entries
    survive), so a value left by an earlier in-process run would leak into later reports and
    make them depend on test order. Paddle is only touched when some test already imported it.
    """
    if "paddle" in sys.modules:
        sys.modules["paddle"].set_flags({BLACKLIST_FLAG: ""})
    yield
    if "paddle" in sys.modules:
        sys.modules["paddle"].set_flags({BLACKLIST_FLAG: ""})


@pytest.fixture(scope="session")
def paddle():
    import paddle as _paddle

    return _paddle


def compose_cfg(*overrides: str):
    """The config a user gets from `python tools/optimize.py <overrides>`."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from graphopt.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="graphopt.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def compose():
    return compose_cfg
