"""The command line: ``python tools/optimize.py model=dsv3 full_cuda_graph=false``.

Hydra reports a bad override with several lines and exit code 1; graphopt promises one line and
exit code 2. So the overrides are composed once up front (cheap, no model is built) and any
error is turned into one line; then Hydra runs as usual. HYDRA_FULL_ERROR=1 skips this.
"""

from __future__ import annotations

import os
import sys
import warnings

import hydra
from omegaconf import DictConfig

CONFIG_MODULE = "graphopt.conf"


def _one_line(e: Exception) -> str:
    from hydra.errors import MissingConfigException

    if isinstance(e, MissingConfigException) and getattr(e, "options", None):
        group = os.path.dirname(e.missing_cfg_file or "") or "config"
        name = os.path.basename(e.missing_cfg_file or "")
        return f"unknown {group} '{name}': choose one of {', '.join(sorted(e.options))}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("full_key:", "object_type", "Set the env"))]
    return " ".join(keep[:2]) if keep else type(e).__name__


def preflight(argv: list[str]) -> str | None:
    """Compose the config with the user's overrides; the error as one line, or None."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

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
            compose(config_name="config", overrides=[
                o for o in overrides if not o.lstrip("+~").startswith("hydra.")
            ])
    except Exception as e:  # every Hydra/OmegaConf error becomes one line
        return _one_line(e)
    finally:
        GlobalHydra.instance().clear()
    return None


#: (job directory, exit code) of every failed job of a sweep
_FAILED_JOBS: list[tuple[str, int]] = []


@hydra.main(version_base="1.3", config_path="pkg://graphopt.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from graphopt.driver import run_cli

    code, message = run_cli(cfg)
    if not code:
        return
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        sys.exit(code)
    # In a sweep one failed job must not stop the others: note it, and fail at the end.
    job_dir = hc.runtime.output_dir
    with open(os.path.join(job_dir, "error.txt"), "w") as f:
        f.write(message + "\n")
    _FAILED_JOBS.append((job_dir, code))


def main() -> None:
    """Console-script entry point (``graphopt``; ``tools/optimize.py`` calls it too)."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    # Paddle warns at import (no ccache, PIR place interface...): noise, not the user's problem.
    warnings.filterwarnings("ignore", category=UserWarning)
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
