"""Write a model config (and its weights) as a HF checkpoint you can edit and read back.

    python tools/export.py out=my_dsv3                             # the default 4-layer dsv3
    python tools/export.py out=my_dsv3 model.num_hidden_layers=2 model.seed=7
    python tools/optimize.py model.config_json=my_dsv3/config.json model.weights=my_dsv3

Takes the same overrides as tools/optimize.py (model=..., model.<HF field>=...), builds the
model (random seeded weights, or model.weights=...) and writes <out>/config.json and
<out>/model.safetensors. Reading both back builds the same model, bit for bit. An <out> that
already holds them is refused unless overwrite=true. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")
warnings.filterwarnings("ignore", category=UserWarning)

from graphopt.cli import check_config  # noqa: E402
from graphopt.errors import ConfigError  # noqa: E402
from graphopt.models import save_model  # noqa: E402

FILES = ("config.json", "model.safetensors")


def export(argv: list[str]) -> list[Path]:
    """Parse ``out=``/``overwrite=`` plus config overrides; write the checkpoint; return files."""
    own = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv
           if a.startswith(("out=", "overwrite="))}
    rest = [a for a in argv if not a.startswith(("out=", "overwrite="))]
    if not own.get("out"):
        raise ConfigError("out=<directory> is required (where config.json and "
                          "model.safetensors go)")
    out = Path(own["out"])
    overwrite = own.get("overwrite", "false").lower() in ("true", "1", "yes")
    taken = [f for f in FILES if (out / f).exists()]
    if taken and not overwrite:
        raise ConfigError(f"out={out}: already holds {', '.join(taken)}; set overwrite=true to "
                          "replace them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out}: exists and is not a directory")
    cfg = check_config(rest)
    if cfg is None:
        raise ConfigError("tools/export.py takes config overrides only (no -m, --cfg, --help)")
    try:
        return save_model(cfg.model, out)
    except OSError as e:
        raise ConfigError(f"out={out}: cannot write it: {e.strerror or e}") from None


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    try:
        files = export(argv)
    except ConfigError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    out = files[0].parent
    for f in files:
        print(f"wrote {f}")
    print(f"use it: python tools/optimize.py model.config_json={out / 'config.json'} "
          f"model.weights={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
