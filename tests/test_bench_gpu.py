"""tools/bench_gpu.py without a GPU: the same code path on ``runtime=torch_cpu`` (every mode,
the replay checks, the compile cache of the two-call 61-layer recipe), and
tools/bench_gpu_report.py on the published runs. The GPU numbers are in docs/gpu.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("torch")

ENV = {**os.environ, "GLOG_minloglevel": "2"}


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "bench_gpu.py"),
                           "runtime=torch_cpu", *args],
                          capture_output=True, text=True, cwd=REPO, env=ENV)


def test_bench_gpu_runs_on_the_cpu_and_a_second_call_hits_the_cache(tmp_path):
    common = ["bench.layers=[2]", "cache.enabled=true",
              f"cache.dir={tmp_path / 'cache'}"]
    first = _bench(*common, "bench.batches=[]", "bench.replay_steps=0",
                   "bench.capture_all=false", f"bench.out={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("cache miss") == 3
    second = _bench(*common, "bench.batches=[decode1,mixed]", "bench.repeats=2",
                    "bench.replay_steps=3", f"bench.out={tmp_path / 'b'}")
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("cache hit") == 3
    r = json.loads((tmp_path / "b" / "bench.json").read_text())["L2"]
    for batch in ("decode1", "mixed"):
        row = r[batch]
        assert row["eager_ms"] > 0 and row["piecewise_ms"] > 0 and row["full_graph_ms"] > 0
        assert row["kernel_ms"] is None  # no CUDA: no replay to time alone
    assert r["max_abs_err"]["eager"] < 1e-4 and r["max_abs_err"]["piecewise"] < 1e-4
    assert r["hoisted_wrong"] == 0 and r["steps"] == 3
    assert (tmp_path / "b" / "bench.png").stat().st_size > 0


def test_bench_gpu_bad_batch_name_is_one_line_exit_2(tmp_path):
    r = _bench("bench.batches=[decode2]", f"bench.out={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "bench.batches=['decode2']: choose from decode1" in r.stderr
    assert not (tmp_path / "bench.json").exists()


def test_report_merges_the_published_runs_and_renders_their_tables(tmp_path):
    raw = REPO / "docs" / "bench" / "gpu" / "raw"
    r = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_gpu_report.py"), str(raw / "L4.json"),
         str(raw / "L61.json"), "--cold", str(raw / "L61-optimize-cold.json"),
         "--attach", f"graph_pools={raw / 'graph-pools.json'}", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    merged = json.loads((tmp_path / "bench.json").read_text())
    cold = json.loads((raw / "L61-optimize-cold.json").read_text())["L61"]["optimize_s"]
    assert merged["L61"]["optimize_s"] == cold  # cold times, not the cache hits
    assert {s["part"] for s in merged["sources"]} == {"L4", "L61", "L61.optimize_s"}
    md = (tmp_path / "bench.md").read_text()
    l4 = json.loads((raw / "L4.json").read_text())["L4"]["decode1"]
    assert f"| decode1 | 1 | {l4['eager_ms']:.2f} | {l4['piecewise_ms']:.2f} |" in md
    # the published files are what this renders
    published = json.loads((REPO / "docs" / "bench" / "gpu" / "bench.json").read_text())
    assert published == merged
    assert (REPO / "docs" / "bench" / "gpu" / "bench.md").read_text() == md


def test_report_missing_file_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "tools" / "bench_gpu_report.py"),
                        str(tmp_path / "nope.json"), "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"bench_gpu_report: error: no such file: {tmp_path / 'nope.json'}"
