"""Optimize a model's decoder step for CUDA-graph capture.

    python tools/optimize.py model=dsv3 full_cuda_graph=false
    python tools/optimize.py model=dsv3 pipeline=none            # the unmodified baseline
    python tools/optimize.py list_passes=true
    python tools/optimize.py -m model.num_hidden_layers=2,4 full_cuda_graph=false   # a sweep

Thin wrapper: the work is ``graphopt.driver.optimize(cfg)``, which tests call directly.
"""

import os
import signal


def _interrupted_while_starting(signum, frame):
    # Importing Paddle takes seconds; a Ctrl-C then is one line too, not an import traceback.
    os.write(2, b"graphopt: interrupted while starting; nothing written\n")
    os._exit(128 + signum)


signal.signal(signal.SIGINT, _interrupted_while_starting)
signal.signal(signal.SIGTERM, _interrupted_while_starting)

from graphopt.cli import main  # noqa: E402  (after the handler: the import is the slow part)

if __name__ == "__main__":
    main()
