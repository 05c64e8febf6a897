"""``verify.bisect=true``: a deliberately wrong plug-in pass, registered through the public
``graphopt.passes`` entry-point group, is named as the pass that broke the step."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import paddle
import pytest

from graphopt.driver import optimize
from graphopt.errors import VerificationError
from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import static_mode
from graphopt.passes import registry
from graphopt.passes.base import Pass, PassResult, Stage
from graphopt.verification import BisectResult
from tests.conftest import compose_cfg


@dataclass
class ScaleOptions:
    factor: float = 2.0


class ScaleFirstOutput(Pass):
    """Multiplies the step's first output (the logits) by `factor`: wrong on purpose."""

    name = "test-scale-first-output"
    summary = "Deliberately wrong: scales the step's first output."
    stage = Stage.PROGRAM
    Options = ScaleOptions
    requires = ("single-graph",)

    def run(self, mp: ModelProgram) -> PassResult:
        out = next(op for op in mp.program.global_block().ops
                   if op.name() == "builtin.shadow_output")
        with static_mode(), paddle.static.program_guard(mp.program):
            paddle.pir.set_insertion_point(out)
            try:
                scaled = paddle.scale(out.operand_source(0), self.options.factor)
            finally:
                paddle.pir.reset_insertion_point_to_end()
        out.operand(0).set_source(scaled)
        return PassResult(modified=True, stats={"scaled": 1})


@pytest.fixture
def plugin(monkeypatch):
    ep = SimpleNamespace(name="scale", value="tests.test_bisect:ScaleFirstOutput",
                         load=lambda: ScaleFirstOutput)
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: [ep] if group == "graphopt.passes" else [])
    yield ScaleFirstOutput.name
    registry._REGISTRY.pop(ScaleFirstOutput.name, None)


def test_bisect_names_the_wrong_plugin_pass(plugin, tmp_path, capsys):
    cfg = compose_cfg(
        "model=tiny", "verify.bisect=true", "verify.steps=4",
        f"pipeline.passes=[capture-control-flow,hoist-host-branch-conditions,{plugin},"
        "cudagraph-blacklist-injection,piecewise-split]")
    with pytest.raises(VerificationError):
        optimize(cfg, run_dir=tmp_path)
    out = capsys.readouterr().out
    assert f"bisect: pass '{plugin}' is the first to make the step differ" in out
    report = json.loads((tmp_path / "report.json").read_text())
    found = report["bisect"]
    assert found["culprit"] == plugin
    # checked after the trace and after each program pass up to (and past) the culprit
    assert [c["after"] for c in found["checks"]] == [
        "trace", "hoist-host-branch-conditions", plugin, "cudagraph-blacklist-injection",
        "piecewise-split"]
    assert max(found["checks"][1]["errors"].values()) <= 1e-5  # hoisting did no harm
    assert max(found["checks"][2]["errors"].values()) > 1e-1
    before = (tmp_path / found["ir_before"]).read_text()
    after = (tmp_path / found["ir_after"]).read_text()
    assert "pd_op.scale" in after and after.count("pd_op.scale") > before.count("pd_op.scale")


def test_bisect_message_when_no_pass_changed_the_numerics():
    result = BisectResult(checks=[{"after": "trace", "errors": {"mixed": 0.0}}])
    assert "every program pass left the numerics equal" in result.message("replay only")
    assert "replay only" in result.message("replay only")


def test_bisect_message_names_the_culprits_own_error():
    """The error quoted is the one measured after the culprit, not after the last pass."""
    result = BisectResult(checks=[{"after": "trace", "errors": {"mixed": 0.0}},
                                  {"after": "bad-pass", "errors": {"mixed": 0.25}},
                                  {"after": "later-pass", "errors": {"mixed": 7.0}}],
                          culprit="bad-pass")
    assert "max abs err 0.25" in result.message()
