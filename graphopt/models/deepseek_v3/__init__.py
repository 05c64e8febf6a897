"""DeepSeek-V3 (MLA + noaux_tc MoE), graphopt's flagship model family.

``build(cfg)`` turns the Hydra ``model`` node (``conf/model/dsv3.yaml``) into a
:class:`models.base.ModelBundle`: config (:mod:`.config`), dygraph Layer (:mod:`.modeling`),
weights (:mod:`.weights`), forward meta and batch builders (:mod:`.batch`).
"""

from __future__ import annotations

from typing import Any

from graphopt.models.base import ModelBundle
from graphopt.models.deepseek_v3.batch import slot_model_bundle
from graphopt.models.deepseek_v3.config import DeepseekV3Config, resolve_config
from graphopt.models.deepseek_v3.modeling import DeepseekV3ForCausalLM, DeepseekV3MLAAttention
from graphopt.models.deepseek_v3.weights import init_random_weights, load_hf_safetensors

__all__ = ["DeepseekV3Config", "DeepseekV3ForCausalLM", "DeepseekV3MLAAttention", "build"]


def build(cfg: Any) -> ModelBundle:
    """Build the DeepSeek-V3 bundle described by the Hydra ``model`` node."""
    config = resolve_config(cfg)
    seed = cfg.get("seed", 0)
    layer = DeepseekV3ForCausalLM(config)
    if cfg.get("weights"):
        load_hf_safetensors(layer, cfg.get("weights"))
    else:
        init_random_weights(layer, seed if seed is not None else 0)
    layer.eval()
    return slot_model_bundle(cfg.get("name") or "dsv3", layer, config)
