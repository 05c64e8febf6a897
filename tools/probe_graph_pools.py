"""Which graph memory pools keep torch_cuda's replays right: one for all graphs, one per
graph, or one per segment (the backend's choice). Needs CUDA (the GPU machine).

Per policy, on the piecewise plan (and the full graph for the backend's own policy): capture
every graph (every size and batch kind), time the bench's batches, then 20 random steps
against the model as written, with EVERY replay checked against an uncaptured run; prints and
writes ``probe-L<n>.json``: graphs dropped, replays checked, graph memory. Run each policy in a
fresh process for its memory figure (``--policy``): pools freed by an earlier trial are reused.

    python tools/probe_graph_pools.py --layers 4 --policy shared --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("GLOG_minloglevel", "2")
sys.path.insert(0, str(Path(__file__).parent))

import bench_gpu as B
import torch
from hydra import initialize_config_dir

from graphopt.runtime.capture import CaptureCheck
from graphopt.runtime.executor import RunnerPool
from graphopt.runtime.step import StepExecutor
from graphopt.runtime.torch_backends import CudaGraphApi, TorchCudaBackend
from graphopt.runtime.variants import VariantStepExecutor


class SharedApi(CudaGraphApi):
    """One pool for every graph (PyTorch's recipe for graphs replayed in capture order)."""

    def capture(self, run: Any, pool_key: Any) -> tuple[Any, list[Any]]:
        return super().capture(run, "all")


class PerGraphApi(CudaGraphApi):
    """A private pool per graph."""

    def capture(self, run: Any, pool_key: Any) -> tuple[Any, list[Any]]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = run()
        return graph, outs


POLICIES = {"shared": SharedApi, "per-graph": PerGraphApi, "per-segment": CudaGraphApi}


def trial(label: str, mp: Any, api: type, layers: int) -> dict[str, Any]:
    backend = type(f"{label}Backend", (TorchCudaBackend,), {"graph_api": api})
    B.fill_state(mp.model, 7)
    vocab = int(mp.model.config.vocab_size)
    sizes = [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    executor = VariantStepExecutor if mp.variants else StepExecutor
    ex = executor(mp, "torch_cuda", sizes, 2, RunnerPool(mp.params),
                  check_captures=CaptureCheck(atol=1e-3, replays=None),
                  backend_factory=lambda name, pool: backend(pool))
    cap = B.capture_everything(ex, mp.model, sizes, B.Clock(True), vocab)
    for i, name in enumerate(("decode1", "decode8", "decode64", "mixed", "prefill")):
        kind, seq_lens, cached = B.batch_spec(name)
        prepared = ex.prepare(B.make_batch(mp.model, kind, seq_lens, cached, vocab, 100 + i))
        for _ in range(4):
            ex.execute(prepared)
    replay = B.replay_check(ex, mp.model, 20, 0, 1e-3, vocab)
    st = ex.stats()
    res = {"label": label, "L": layers, "capture": cap, "dropped": len(st["dropped_graphs"]),
           "dropped_list": st["dropped_graphs"][:20], "counters": B._counters(ex),
           "replay": replay}
    print("probe:", json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--policy", choices=sorted(POLICIES), default="per-segment")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    conf = str(Path(__file__).resolve().parent.parent / "graphopt" / "conf")
    over = ["model=dsv3", f"model.num_hidden_layers={args.layers}", "model.max_num_seqs=64",
            "model.max_seq_len=64", "runtime=torch_cuda"]
    results = []
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        mp, _ = B.optimize_pipeline(over, "cudagraph")
        results.append(trial(args.policy, mp, POLICIES[args.policy], args.layers))
        if args.policy == "per-segment":
            fg, _ = B.optimize_pipeline(over, "full_graph")
            results.append(trial("full-" + args.policy, fg, POLICIES[args.policy], args.layers))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"probe-L{args.layers}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
