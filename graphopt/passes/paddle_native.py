"""paddle-native: run Paddle's own C++ PIR passes by name (reuse, don't rewrite).

    pipeline:
      passes: [..., paddle-native]
      options:
        paddle-native:
          passes: [dead_code_elimination_pass, common_subexpression_elimination_pass]

Before (``%2`` is dead)::

    (%1) = "pd_op.relu" (%0)
    (%2) = "pd_op.exp" (%0)
    () = "builtin.shadow_output" (%1) {output_name:"out"}

After ``dead_code_elimination_pass``::

    (%1) = "pd_op.relu" (%0)
    () = "builtin.shadow_output" (%1) {output_name:"out"}

Outputs survive: ``builtin.shadow_output`` ops are side-effecting roots, so DCE keeps everything
they read; feeds (``pd_op.data``) are kept too, unused weights (``builtin.parameter``) are not.

Paddle has no API that lists its registered PIR passes, and ``PassManager.add_pass`` on an
unknown name raises ``ValueError`` — so names are validated up front by adding each one to a
throw-away PassManager, and the error for a typo suggests close names from
:data:`KNOWN_PASSES` (a snapshot of Paddle 3.3's registrations, filtered to those this build
really has).
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field

import paddle

from graphopt.errors import ConfigError
from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import op_count, program_text, run_paddle_passes
from graphopt.passes.base import Pass, PassResult, Stage
from graphopt.passes.registry import register_pass

#: Names registered in Paddle 3.3 (``REGISTER_IR_PASS``), used only to suggest a fix for a typo.
KNOWN_PASSES = (
    "add_norm_fuse_pass",
    "add_shadow_output_after_dead_parameter_pass",
    "auto_layout_insert_pass",
    "auto_layout_pass",
    "auto_mixed_precision_pass",
    "batch_norm_act_fuse_pass",
    "common_subexpression_elimination_pass",
    "constant_folding_pass",
    "conv2d_add_act_fuse_pass",
    "conv2d_add_fuse_pass",
    "conv2d_bn_onednn_fuse_pass",
    "cpu_bfloat16_pass",
    "dead_code_elimination_pass",
    "delete_assert_op_pass",
    "delete_quant_dequant_linear_op_pass",
    "delete_weight_dequant_linear_op_pass",
    "embedding_eltwise_layernorm_fuse_pass",
    "fc_activation_fuse_pass",
    "fused_dot_product_attention_pass",
    "fused_dropout_add_pass",
    "fused_flash_attn_pass",
    "fused_gemm_epilogue_pass",
    "fused_linear_param_grad_add_pass",
    "fused_rotary_position_embedding_pass",
    "fused_weight_only_linear_pass",
    "horizontal_fuse_pass",
    "identity_op_clean_pass",
    "inplace_pass",
    "map_op_to_another_pass",
    "matmul_add_act_fuse_pass",
    "matmul_scale_fuse_pass",
    "multihead_matmul_fuse_pass",
    "reshape_transpose_matmul_fuse_pass",
    "scale_matmul_fuse_pass",
    "transfer_layout_pass",
    "transpose_flatten_concat_fuse_pass",
)

@functools.cache
def is_registered(name: str) -> bool:
    """Whether `name` is a PIR pass registered in this Paddle build (no program is touched)."""
    try:
        paddle.pir.PassManager().add_pass(name, {})
    except Exception:  # Paddle raises ValueError "(InvalidArgument) Pass x has not been registered"
        return False
    return True


def known_passes() -> list[str]:
    """The names of :data:`KNOWN_PASSES` this build has (not exhaustive: Paddle can't list them)."""
    return [n for n in KNOWN_PASSES if is_registered(n)]


def check_pass_name(name: str) -> None:
    """ConfigError for a name that is not a registered Paddle PIR pass, with suggestions."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a Paddle PIR pass name must be a non-empty string, got {name!r}")
    if is_registered(name):
        return
    known = known_passes()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(
        f"unknown Paddle PIR pass '{name}'.{hint} Known: {', '.join(known)} (Paddle cannot list "
        "its passes; the full set is the REGISTER_IR_PASS names under paddle/fluid/pir/transforms)"
    )


@dataclass
class PaddleNativeOptions:
    """Options of paddle-native."""

    passes: list[str] = field(
        default_factory=lambda: ["dead_code_elimination_pass"],
        metadata={
            "help": "Paddle C++ PIR pass names, run in this order by one paddle.pir.PassManager"
        },
    )

    def __post_init__(self) -> None:
        # Validated when the pipeline is built, so a typo fails before any tracing.
        for name in self.passes:
            check_pass_name(name)


@register_pass
class PaddleNative(Pass):
    """Run Paddle C++ PIR passes (DCE, CSE, fusions...) on the program, by name."""

    name = "paddle-native"
    summary = "Run Paddle's own C++ PIR passes by name (dead_code_elimination_pass, CSE, ...)."
    stage = Stage.PROGRAM
    Options = PaddleNativeOptions
    # it rewrites the main program only: variants and segment plans cut before it would go stale
    must_run_before = ("specialize-branches", "piecewise-split")

    def run(self, mp: ModelProgram) -> PassResult:
        program = mp.program
        ops_before = op_count(program, compute_only=False)
        text_before = program_text(program)
        run_paddle_passes(program, self.options.passes)
        ops_after = op_count(program, compute_only=False)
        # Op count first (cheap); equal counts can still hide a rewrite, so compare the text.
        modified = ops_after != ops_before or program_text(program) != text_before
        return PassResult(
            modified=modified,
            stats={
                "passes": list(self.options.passes),
                "ops_before": ops_before,
                "ops_after": ops_after,
            },
        )
