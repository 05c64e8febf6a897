"""``python -m graphopt model=tiny``: the same command as ``python tools/optimize.py model=tiny``
and the ``graphopt`` console script; all three run :func:`graphopt.cli.main`."""

from __future__ import annotations

import os
import signal
from types import FrameType


def _interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    # Importing Paddle takes seconds; a Ctrl-C then is one line too, not an import traceback
    # (graphopt.cli.main installs the run's own handler once it is imported).
    os.write(2, b"graphopt: interrupted while starting; nothing written\n")
    os._exit(128 + signum)


def main() -> None:
    """Run the command line (:func:`graphopt.cli.main`), one line on a Ctrl-C while starting."""
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    signal.signal(signal.SIGTERM, _interrupted_while_starting)
    from graphopt.cli import main as cli_main  # the slow import, after the handler

    cli_main()


if __name__ == "__main__":
    main()
