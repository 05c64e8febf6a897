"""DeepSeek-V3 (MLA + noaux_tc MoE), graphopt's flagship model family.

``build(cfg)`` turns the Hydra ``model`` node (``conf/model/dsv3.yaml``) into a
:class:`graphopt.models.base.ModelBundle`: config (:mod:`.config`), dygraph Layer
(:mod:`.modeling`), weights (:mod:`.weights`); forward meta and batch builders come from
:mod:`graphopt.models.slots`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from graphopt.models.base import FLOAT32_BYTES, MemoryEstimate, ModelBundle, file_provenance
from graphopt.models.deepseek_v3.config import (
    SHIPPED_CONFIG_JSON,
    DeepseekV3Config,
    DeepseekV3Node,
    cache_values,
    parameter_count,
    resolve_config,
    write_hf_config,
)
from graphopt.models.deepseek_v3.modeling import (
    DeepseekV3ForCausalLM,
    DeepseekV3MLAAttention,
    set_branch_flags,
)
from graphopt.models.deepseek_v3.weights import (
    init_random_weights,
    load_hf_safetensors,
    save_hf_safetensors,
)
from graphopt.models.slots import slot_model_bundle

__all__ = ["DeepseekV3Config", "DeepseekV3ForCausalLM", "DeepseekV3MLAAttention", "DeepseekV3Node", "build",
           "check", "estimate_memory", "save"]


def check(**node: Any) -> None:
    """Validate the ``model`` node's config (config.json and overrides) without building."""
    resolve_config(node)


def estimate_memory(**node: Any) -> MemoryEstimate:
    """Parameters and latent caches of the model the node's keys build, counted from its
    config without building it (see :class:`MemoryEstimate`)."""
    config = resolve_config(node)
    params = parameter_count(config) * FLOAT32_BYTES
    caches = cache_values(config) * FLOAT32_BYTES
    if params >= caches:
        reduce = {"num_hidden_layers": config.num_hidden_layers,
                  "n_routed_experts": config.n_routed_experts, "hidden_size": config.hidden_size}
    else:
        reduce = {"max_num_seqs": config.max_num_seqs, "max_seq_len": config.max_seq_len,
                  "num_hidden_layers": config.num_hidden_layers}
    return MemoryEstimate(params, caches, reduce)


def build(**node: Any) -> ModelBundle:
    """Build the DeepSeek-V3 bundle from the ``model`` node's keys (see :class:`DeepseekV3Node`)."""
    config = resolve_config(node)
    layer = DeepseekV3ForCausalLM(config)
    weights = node.get("weights")
    if weights:
        load_hf_safetensors(layer, weights)
    else:
        init_random_weights(layer, node.get("seed") or 0)
    layer.eval()
    seed_form = {"host_inputs": ("max_len_tensor_cpu", "needs_prefill", "needs_decode"),
                 "prepare_meta": set_branch_flags} if config.attention_form == "seed" else {}
    bundle = slot_model_bundle(node.get("name") or "dsv3", layer, config, **seed_form)
    bundle.provenance = {
        "config_json": file_provenance(node.get("config_json") or SHIPPED_CONFIG_JSON),
        "weights": file_provenance(weights) if weights
        else {"random": True, "seed": node.get("seed") or 0},
    }
    return bundle


def save(bundle: ModelBundle, out_dir: str | Path) -> list[Path]:
    """Write `bundle` as a HF checkpoint: ``config.json`` + ``model.safetensors`` in `out_dir`.

    Reading both back (``model.config_json=<dir>/config.json model.weights=<dir>``) builds the
    same model. Each file is written to a temp name and renamed, so no half-written file is left.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, write in (("config.json", lambda p: write_hf_config(bundle.config, p)),
                        ("model.safetensors", lambda p: save_hf_safetensors(bundle.layer, p))):
        tmp = out / f".{name}.tmp"
        try:
            write(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out / name)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(out / name)
    return written
