"""The README's "Adding a pass" example, run as written."""

from __future__ import annotations

import re
import sys
import types

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
