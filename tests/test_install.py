"""An installed wheel works from any directory, next to a user's own `conf/` and `models/`."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import venv

from tests.conftest import REPO


def test_wheel_runs_beside_a_users_own_conf_and_models(tmp_path):
    env_dir = tmp_path / "venv"
    # system site packages: Paddle and Hydra come from the test machine, graphopt from the wheel
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                    "--target", str(tmp_path / "site"), str(REPO)], check=True,
                   capture_output=True)
    project = tmp_path / "project"
    for pkg in ("conf", "models"):
        (project / pkg).mkdir(parents=True)
        (project / pkg / "__init__.py").write_text(f"NAME = 'the user project own {pkg}'\n")
    (project / "conf" / "config.yaml").write_text("not_graphopt: true\n")
    # the test's own site-packages too: when it runs in a virtual environment, Paddle and Hydra
    # live there, not in the base interpreter the new venv sees (an editable graphopt there is
    # a .pth hook, which PYTHONPATH entries do not run: the wheel's copy stays the one found)
    outer = [p for p in site.getsitepackages() if os.path.isdir(p)]
    env = {**os.environ, "GLOG_minloglevel": "2",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *outer])}
    probe = subprocess.run(
        [str(python), "-c", "import conf, models, graphopt; "
         "print(conf.NAME, models.NAME, graphopt.__file__, sep='|')"],
        cwd=project, env=env, capture_output=True, text=True, check=True).stdout.strip()
    own_conf, own_models, where = probe.split("|")
    assert own_conf.endswith("own conf") and own_models.endswith("own models")
    assert where.startswith(str(tmp_path / "site"))  # the installed copy, not the checkout
    run = subprocess.run(
        [str(python), "-c", "from graphopt.cli import main; main()", "model=tiny",
         f"hydra.run.dir={tmp_path / 'run'}", "verify.steps=4"],
        cwd=project, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["verified"] is True
