"""Optimize a model's decoder step for CUDA-graph capture.

    python tools/optimize.py model=dsv3 full_cuda_graph=false
    python tools/optimize.py model=dsv3 pipeline=none            # the unmodified baseline
    python tools/optimize.py list_passes=true
    python tools/optimize.py -m model.num_hidden_layers=2,4 full_cuda_graph=false   # a sweep

Thin wrapper: the work is ``graphopt.driver.optimize(cfg)``, which tests call directly.
"""

from graphopt.cli import main

if __name__ == "__main__":
    main()
