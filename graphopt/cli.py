"""The command line: ``python tools/optimize.py model=dsv3 full_cuda_graph=false``.

Hydra reports a bad override with several lines and exit code 1; graphopt promises one line and
exit code 2. So the config is composed and validated up front with the user's overrides
(cheap: no model is built) and any error becomes one line; then Hydra runs as usual.
``HYDRA_FULL_ERROR=1`` skips this and shows every traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig

from graphopt.config import SCHEMA_SUFFIX, register_configs, validate
from graphopt.driver import optimize
from graphopt.errors import ConfigError, GraphoptError, VerificationError, one_line
from graphopt.report.report import write_atomic

CONFIG_MODULE = "graphopt.conf"
register_configs()


def _hydra_one_line(e: Exception) -> str:
    if isinstance(e, MissingConfigException) and getattr(e, "options", None):
        group = os.path.dirname(e.missing_cfg_file or "") or "config"
        name = os.path.basename(e.missing_cfg_file or "")
        options = sorted(o for o in e.options if not o.endswith(SCHEMA_SUFFIX))
        return f"unknown {group} '{name}': choose one of {', '.join(options)}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("full_key:", "object_type", "Set the env"))]
    return " ".join(keep[:2]) if keep else type(e).__name__


def _search_path(overrides: list[str]) -> list[str]:
    """The user's ``hydra.searchpath=[...]`` override, if any, to compose with it too."""
    return [o for o in overrides if o.lstrip("+").startswith("hydra.searchpath=")]


def preflight(argv: list[str]) -> str | None:
    """Compose and validate the config with the user's overrides; the error as one line."""
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    if any(a in ("-m", "--multirun") for a in argv):
        return None  # sweeps are checked per job
    if any(a.startswith(("--cfg", "-c", "--help", "-h", "--info", "--hydra-help")) for a in argv):
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        if any(o.is_sweep_override() for o in parsed):
            return "a sweep (a,b) needs -m: python tools/optimize.py -m " + " ".join(overrides)
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            keep = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
            cfg = compose(config_name="config", overrides=keep + _search_path(overrides))
        validate(cfg)
    except ConfigError as e:
        return str(e)
    except Exception as e:  # every Hydra/OmegaConf error becomes one line
        return _hydra_one_line(e)
    finally:
        GlobalHydra.instance().clear()
    return None


def run(cfg: DictConfig) -> tuple[int, str]:
    """One job: errors become one line and an exit code (2: bad input, 1: a failed run)."""
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        optimize(cfg)
        return 0, ""
    except VerificationError as e:
        code, message = 1, f"graphopt: verification failed: {e}"
    except GraphoptError as e:
        if full:
            raise
        code = 2 if isinstance(e, ConfigError) or isinstance(e.__cause__, ConfigError) else 1
        message = f"graphopt: error: {one_line(e)}"
    print(message, file=sys.stderr)
    return code, message


#: (job directory, exit code) of every failed job of a sweep
_FAILED_JOBS: list[tuple[str, int]] = []


@hydra.main(version_base="1.3", config_path="pkg://graphopt.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    code, message = run(cfg)
    if not code:
        return
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        sys.exit(code)
    # In a sweep one failed job must not stop the others: note it, and fail at the end.
    write_atomic(Path(hc.runtime.output_dir) / "error.txt", message + "\n")
    _FAILED_JOBS.append((hc.runtime.output_dir, code))


def main() -> None:
    """Console-script entry point (``graphopt``; ``tools/optimize.py`` calls it too)."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    # Paddle warns at import (no ccache, PIR place interface...): noise, not the user's problem.
    warnings.filterwarnings("ignore", category=UserWarning)
    # A model config's `_target_` names the user's own module: import it from where the user
    # runs the command, as `python -m` would.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if os.environ.get("HYDRA_FULL_ERROR") != "1":
        err = preflight(sys.argv[1:])
        if err:
            print(f"graphopt: error: {err}", file=sys.stderr)
            sys.exit(2)
    _hydra_main()
    if _FAILED_JOBS:
        print(f"graphopt: {len(_FAILED_JOBS)} sweep job(s) failed: "
              + ", ".join(d for d, _ in _FAILED_JOBS), file=sys.stderr)
        sys.exit(max(c for _, c in _FAILED_JOBS))
