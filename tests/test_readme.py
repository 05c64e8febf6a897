"""The README's "Adding a pass" example run as written; the IR-dump lines of docs/passes.md and the
segment-picture label of docs/reliability.md still true."""

from __future__ import annotations

import inspect
import re
import sys
import types

from graphopt.models.deepseek_v3.modeling import FastDeploy2025MLAAttention
from graphopt.passes.manager import PassManager
from graphopt.passes.registry import _REGISTRY
from tests import programs as P
from tests.conftest import REPO


def test_the_readme_pass_example_registers_and_runs():
    text = (REPO / "README.md").read_text()
    (block,) = re.findall(r"### Adding a pass\n\n```python\n(.*?)```", text, flags=re.S)
    module = types.ModuleType("readme_example")  # dataclasses look their module up
    sys.modules[module.__name__] = module
    try:
        exec(compile(block, "README.md", "exec"), module.__dict__)
        mp = P.model_program(P.build_cond_program(hoisted=True))
        (record,) = PassManager.from_config(["count-ops"], {"count-ops": {"op": "pd_op.if"}}
                                            ).run(mp)
        assert record.stats == {"count": 2} and not record.modified
    finally:
        _REGISTRY.pop("count-ops", None)
        sys.modules.pop(module.__name__, None)


def test_the_readme_ir_dump_example_names_the_models_current_lines():
    """The dump_ir example quotes file:line of the default model: it must not drift."""
    text = (REPO / "docs" / "passes.md").read_text()
    (def_line,) = re.findall(r"FastDeploy2025MLAAttention\.forward at "
                             r"graphopt/models/deepseek_v3/modeling\.py:(\d+)", text)
    (if_line,) = re.findall(r"before the if at line (\d+)", text)
    lines, first = inspect.getsourcelines(FastDeploy2025MLAAttention.forward)
    first_if = next(first + i for i, ln in enumerate(lines) if ln.strip().startswith("if "))
    assert (int(def_line), int(if_line)) == (first, first_if)
    picture = (REPO / "docs" / "reliability.md").read_text()
    assert f"(modeling.py:{first_if})" in picture  # the picture's label example
