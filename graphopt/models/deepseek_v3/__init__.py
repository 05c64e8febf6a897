"""DeepSeek-V3 (MLA + noaux_tc MoE), graphopt's flagship model family.

``build(cfg)`` turns the Hydra ``model`` node (``conf/model/dsv3.yaml``) into a
:class:`models.base.ModelBundle`: config (:mod:`.config`), dygraph Layer (:mod:`.modeling`),
weights (:mod:`.weights`), forward meta and batch builders (:mod:`.batch`).
"""

from __future__ import annotations

from typing import Any

from graphopt.models.base import ModelBundle, file_provenance
from graphopt.models.deepseek_v3.batch import slot_model_bundle
from graphopt.models.deepseek_v3.config import (
    SHIPPED_CONFIG_JSON,
    DeepseekV3Config,
    DeepseekV3Node,
    resolve_config,
)
from graphopt.models.deepseek_v3.modeling import DeepseekV3ForCausalLM, DeepseekV3MLAAttention
from graphopt.models.deepseek_v3.weights import init_random_weights, load_hf_safetensors

__all__ = ["DeepseekV3Config", "DeepseekV3ForCausalLM", "DeepseekV3MLAAttention", "DeepseekV3Node", "build",
           "check"]


def check(**node: Any) -> None:
    """Validate the ``model`` node's config (config.json and overrides) without building."""
    resolve_config(node)


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
    bundle = slot_model_bundle(node.get("name") or "dsv3", layer, config)
    bundle.provenance = {
        "config_json": file_provenance(node.get("config_json") or SHIPPED_CONFIG_JSON),
        "weights": file_provenance(weights) if weights
        else {"random": True, "seed": node.get("seed") or 0},
    }
    return bundle
