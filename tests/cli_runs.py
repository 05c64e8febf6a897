"""Running the real command in a subprocess, as users do (shared by the CLI and e2e tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO


def run_cli(*args: str, cwd: Path | str | None = None,
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python tools/optimize.py <args>``; its exit code and output, nothing checked."""
    env = {**os.environ, "GLOG_minloglevel": "2"}
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "optimize.py"), *args],
        # no wall-clock limit: a correct run on a loaded machine must not fail (CI caps the job)
        capture_output=True, text=True, cwd=cwd or REPO, env=env,
    )


def run_report(run_dir: Path, *overrides: str) -> tuple[dict[str, Any], str]:
    """Run the command into `run_dir`, require exit 0; its report.json and stdout."""
    r = run_cli(*overrides, f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return json.loads((Path(run_dir) / "report.json").read_text()), r.stdout
