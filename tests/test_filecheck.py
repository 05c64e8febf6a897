"""The golden-text checker itself: it must fail when the text does not match."""

from __future__ import annotations

import pytest

from tests.filecheck import filecheck

TEXT = """(%0) = "pd_op.data" () {name:"x"}
(%1) = "pd_op.relu" (%0)
(%2) = "pd_op.exp" (%1)
() = "builtin.shadow_output" (%2)"""


def test_matches_with_captures_and_next():
    filecheck(TEXT, """
        CHECK: ([[X:%[0-9]+]]) = "pd_op.data"
        CHECK-NEXT: ([[R:%[0-9]+]]) = "pd_op.relu" ([[X]])
        CHECK-NOT: "pd_op.tanh"
        CHECK: "builtin.shadow_output"
    """)


@pytest.mark.parametrize("spec,needle", [
    ('CHECK: "pd_op.tanh"', "not found"),
    ('CHECK: "pd_op.data"\nCHECK-NEXT: "pd_op.exp"', "not found"),
    ('CHECK: ([[X:%[0-9]+]]) = "pd_op.data"\nCHECK: "pd_op.exp" ([[X]])', "not found"),
    ('CHECK: "pd_op.data"\nCHECK-NOT: "pd_op.relu"\nCHECK: "pd_op.exp"', "CHECK-NOT"),
    ('CHECK: "pd_op.relu" ([[Y]])', "before it was captured"),
])
def test_fails_when_the_text_differs(spec, needle):
    with pytest.raises(AssertionError, match=needle.replace("(", r"\(")):
        filecheck(TEXT, spec)
