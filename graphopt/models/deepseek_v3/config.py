"""DeepSeek-V3 model config: a HF-style ``config.json`` plus graphopt's Hydra overrides.

The Hydra node ``conf/model/dsv3.yaml`` (typed by :class:`DeepseekV3Node`) holds graphopt's own
keys and HF field overrides under their HF names (``model.hidden_size=512``). Precedence, lowest
first: the config.json (``config_json``, or the shipped one: DeepSeek-V3's real public config),
then ``shipped_overrides`` (a CPU-sized model) only when no ``config_json`` is given, then every
HF field set explicitly. So a user's own config.json is never overridden by graphopt's defaults.

Every error is a one-line :class:`graphopt.errors.ConfigError` that names the offending field
(or file), so the command line can show it and exit 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.errors import ConfigError

#: DeepSeek-V3's real config (HF field names), used when ``config_json`` is null.
SHIPPED_CONFIG_JSON = Path(__file__).with_name("config.json")

#: Keys of the Hydra node that are graphopt's, not HF fields.
GRAPHOPT_KEYS = ("_target_", "name", "family", "config_json", "weights", "seed", "max_num_seqs",
                 "max_seq_len", "shipped_overrides", "attention_form")

# fmt: off
#: Every field HF's ``DeepseekV3Config`` (configuration_deepseek.py) and ``PretrainedConfig``
#: write to a DeepSeek-V3 ``config.json``. Overrides must name one of these (or a key of the
#: config.json being read), so a typo like ``hiden_size`` fails instead of being ignored.
KNOWN_HF_FIELDS = frozenset(
    {
        "architectures", "attention_bias", "attention_dropout", "auto_map", "aux_loss_alpha",
        "bos_token_id", "eos_token_id", "ep_size", "first_k_dense_replace", "hidden_act",
        "hidden_size", "initializer_range", "intermediate_size", "kv_lora_rank",
        "max_position_embeddings", "model_type", "moe_intermediate_size", "moe_layer_freq",
        "n_group", "n_routed_experts", "n_shared_experts", "norm_topk_prob",
        "num_attention_heads", "num_experts_per_tok", "num_hidden_layers", "num_key_value_heads",
        "num_nextn_predict_layers", "pad_token_id", "pretraining_tp", "q_lora_rank",
        "qk_nope_head_dim", "qk_rope_head_dim", "quantization_config", "rms_norm_eps",
        "rope_scaling", "rope_theta", "routed_scaling_factor", "scoring_func", "seq_aux",
        "tie_word_embeddings", "topk_group", "topk_method", "torch_dtype",
        "transformers_version", "use_cache", "v_head_dim", "vocab_size",
    }
)

#: HF fields the model reads; a config.json without one of them is rejected.
REQUIRED_HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
    "scoring_func", "topk_method", "first_k_dense_replace", "moe_layer_freq", "hidden_act",
    "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
)

_POSITIVE_INTS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_group",
    "topk_group", "moe_layer_freq", "max_position_embeddings",
)
_NON_NEGATIVE_INTS = ("n_shared_experts", "first_k_dense_replace")
_POSITIVE_FLOATS = ("routed_scaling_factor", "rms_norm_eps", "rope_theta")
_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
# fmt: on


@dataclass(frozen=True)
class DeepseekV3Config:
    """The resolved model config: HF fields under their HF names, plus graphopt's sizes.

    Only the fields the model reads are attributes; ``hf`` keeps the whole HF dict (unused
    fields included) so :func:`write_hf_config` round-trips it.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    moe_layer_freq: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    #: graphopt: sequences the latent cache holds (plus one scratch slot for padding tokens).
    max_num_seqs: int = 8
    #: graphopt: cache rows per sequence (= the RoPE table length).
    max_seq_len: int = 64
    #: graphopt: how the MLA attention writes its prefill/decode branches (modeling.py)
    attention_form: str = "fastdeploy_2025"
    hf: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one latent-cache row: normalised c_kv then the rotated k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """HF's rule: MoE from ``first_k_dense_replace`` on, every ``moe_layer_freq``-th layer."""
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim**-0.5``, times YaRN's ``mscale**2`` (DeepSeek-V3 reference)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            mscale = yarn_get_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= mscale * mscale
        return scale


def parameter_count(c: DeepseekV3Config) -> int:
    """Values in the parameters :class:`~.modeling.DeepseekV3ForCausalLM` creates for `c`
    (the RoPE tables are buffers, derived, and not counted)."""
    h, heads = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank is None:
        attn = h * heads * c.qk_head_dim
    else:
        attn = h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * c.qk_head_dim
    attn += (h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
             + c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)
             + heads * c.v_head_dim * h)
    dense = 3 * h * c.intermediate_size
    e, mi = c.n_routed_experts, c.moe_intermediate_size
    moe = h * e + e + 3 * e * h * mi + 3 * h * mi * c.n_shared_experts
    # is_moe_layer's count in closed form: multiples of moe_layer_freq in [k, layers)
    last, k, f = c.num_hidden_layers - 1, c.first_k_dense_replace, c.moe_layer_freq
    n_moe = max(0, last // f - (k - 1) // f) if last >= k else 0
    layers = c.num_hidden_layers * (attn + 2 * h) + n_moe * moe \
        + (c.num_hidden_layers - n_moe) * dense
    return layers + 2 * c.vocab_size * h + h  # + embedding, lm_head, final norm


def cache_values(c: DeepseekV3Config) -> int:
    """Values in the latent caches: one per layer, ``[max_num_seqs + 1, max_seq_len, latent]``
    (the extra slot is the scratch slot padding tokens write to)."""
    return c.num_hidden_layers * (c.max_num_seqs + 1) * c.max_seq_len * c.latent_dim


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention-temperature factor: ``0.1 * mscale * ln(scale) + 1`` (1 if scale <= 1)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# -- reading / writing config.json ----------------------------------------------------------


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """Read a HF ``config.json``; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"model config_json {str(path)!r}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"model config_json {str(path)!r}: invalid JSON at line {e.lineno} column {e.colno}: "
            f"{e.msg}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"model config_json {str(path)!r}: expected a JSON object at top level")
    return data


def write_hf_config(config: DeepseekV3Config | Mapping[str, Any], path: str | Path) -> None:
    """Write the HF fields (graphopt's keys excluded) as a ``config.json``."""
    hf = config.hf if isinstance(config, DeepseekV3Config) else dict(config)
    Path(path).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")


# -- resolving the Hydra node ---------------------------------------------------------------


class AttentionForm(str, enum.Enum):
    """The forms FastDeploy's MLA attention has been written in (graphopt/models/deepseek_v3/
    modeling.py): every form computes the same function."""

    fastdeploy_2025 = "fastdeploy_2025"
    fastdeploy_2026 = "fastdeploy_2026"
    seed = "seed"
    graphopt = "graphopt"


@dataclass
class DeepseekV3Node:
    """Schema of the ``model`` node of the DeepSeek-V3 family (Hydra checks every value).

    HF fields left ``None`` are taken from the config.json; only what the model reads can be
    overridden from the command line.
    """

    _target_: str = "graphopt.models.deepseek_v3.build"
    name: str = "dsv3"
    #: a HF config.json; None = the shipped DeepSeek-V3 config, made CPU-sized by shipped_overrides
    config_json: str | None = None
    #: a HF safetensors file or directory; None = random weights from `seed`
    weights: str | None = None
    seed: int = 0
    #: cache slots (+1 scratch slot for padding tokens)
    max_num_seqs: int = 8
    #: cache rows per slot
    max_seq_len: int = 64
    #: how the MLA attention writes its prefill/decode branches (see modeling.py)
    attention_form: AttentionForm = AttentionForm.fastdeploy_2025
    #: HF fields applied only to the shipped config.json
    shipped_overrides: dict[str, Any] = field(default_factory=dict)
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    moe_intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float | None = None
    norm_topk_prob: bool | None = None
    scoring_func: str | None = None
    topk_method: str | None = None
    first_k_dense_replace: int | None = None
    moe_layer_freq: int | None = None
    hidden_act: str | None = None
    rms_norm_eps: float | None = None
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int | None = None
    initializer_range: float | None = None
    tie_word_embeddings: bool | None = None
    num_nextn_predict_layers: int | None = None


def _unknown_field(key: str, known: set[str] | frozenset[str]) -> ConfigError:
    close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"model.{key}: not a DeepSeek-V3 HF config field nor a graphopt key{hint}")


def _apply(hf: dict[str, Any], overrides: Mapping[str, Any], known: set[str], where: str) -> None:
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in known:
            raise _unknown_field(f"{where}{key}", known)
        if isinstance(value, dict) and isinstance(hf.get(key), dict):
            # model.rope_scaling.factor=4 changes one key of the dict, not the whole dict.
            hf[key] = {**hf[key], **value}
        else:
            hf[key] = value


def resolve_config(node: Mapping[str, Any]) -> DeepseekV3Config:
    """Config for the ``model`` node's keys: config.json (shipped or given), the shipped
    overrides (shipped config only), then the HF fields set explicitly (see module doc)."""
    node = dict(node)
    given = node.get("config_json")
    source = Path(given) if given else SHIPPED_CONFIG_JSON
    hf = read_hf_config(source)
    known = set(KNOWN_HF_FIELDS | set(hf))
    if not given:
        _apply(hf, node.get("shipped_overrides") or {}, known, "shipped_overrides.")
    _apply(hf, {k: v for k, v in node.items() if k not in GRAPHOPT_KEYS}, known, "")
    config = config_from_hf(
        hf,
        max_num_seqs=node.get("max_num_seqs", 8),
        max_seq_len=node.get("max_seq_len", 64),
        source=str(source),
    )
    form = str(getattr(node.get("attention_form"), "value", node.get("attention_form"))
               or AttentionForm.fastdeploy_2025.value)
    if form not in AttentionForm.__members__:
        raise ConfigError(f"model.attention_form={form!r}: choose one of "
                          f"{', '.join(AttentionForm.__members__)}")
    return dataclasses.replace(config, attention_form=form)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def config_from_hf(
    hf: Mapping[str, Any], max_num_seqs: int = 8, max_seq_len: int = 64, source: str = "config"
) -> DeepseekV3Config:
    """Validate a HF config dict and build the resolved config (ConfigError naming the field)."""
    hf = dict(hf)
    missing = [k for k in REQUIRED_HF_FIELDS if k not in hf]
    if missing:
        raise ConfigError(
            f"model.{missing[0]}: missing from {source}"
            + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else "")
        )

    def fail(key: str, why: str) -> ConfigError:
        return ConfigError(f"model.{key}={hf.get(key)!r}: {why}")

    for k in _POSITIVE_INTS:
        if not _is_int(hf[k]) or hf[k] <= 0:
            raise fail(k, "must be a positive integer")
    for k in _NON_NEGATIVE_INTS:
        if not _is_int(hf[k]) or hf[k] < 0:
            raise fail(k, "must be a non-negative integer")
    for k in _POSITIVE_FLOATS:
        if isinstance(hf[k], bool) or not isinstance(hf[k], (int, float)) or not hf[k] > 0:
            raise fail(k, "must be a positive number")
    if hf["q_lora_rank"] is not None and (not _is_int(hf["q_lora_rank"]) or hf["q_lora_rank"] <= 0):
        raise fail("q_lora_rank", "must be a positive integer or null (no query compression)")
    if not isinstance(hf["norm_topk_prob"], bool):
        raise fail("norm_topk_prob", "must be true or false")
    if hf["qk_rope_head_dim"] % 2:
        raise fail("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
    # Only what DeepSeek-V3 uses is implemented; anything else would silently compute another model.
    if hf["scoring_func"] != "sigmoid":
        raise fail("scoring_func", "only 'sigmoid' (DeepSeek-V3) is implemented")
    if hf["topk_method"] != "noaux_tc":
        raise fail("topk_method", "only 'noaux_tc' (DeepSeek-V3) is implemented")
    if hf["hidden_act"] != "silu":
        raise fail("hidden_act", "only 'silu' is implemented")
    if hf.get("tie_word_embeddings"):
        raise fail(
            "tie_word_embeddings", "tied embeddings are not implemented (DeepSeek-V3: false)"
        )
    if hf["n_routed_experts"] % hf["n_group"]:
        raise fail("n_group", f"must divide n_routed_experts={hf['n_routed_experts']}")
    if hf["topk_group"] > hf["n_group"]:
        raise fail("topk_group", f"must be <= n_group={hf['n_group']}")
    if hf["num_experts_per_tok"] > hf["n_routed_experts"]:
        raise fail("num_experts_per_tok", f"must be <= n_routed_experts={hf['n_routed_experts']}")
    candidates = hf["topk_group"] * (hf["n_routed_experts"] // hf["n_group"])
    if hf["num_experts_per_tok"] > candidates:
        raise fail(
            "num_experts_per_tok",
            f"must be <= topk_group * experts per group = {candidates} (experts the groups allow)",
        )
    if hf["first_k_dense_replace"] > hf["num_hidden_layers"]:
        raise fail(
            "first_k_dense_replace", f"must be <= num_hidden_layers={hf['num_hidden_layers']}"
        )
    rs = hf["rope_scaling"]
    if rs is not None:
        if not isinstance(rs, dict):
            raise fail("rope_scaling", "must be a dict or null")
        kind = rs.get("type", rs.get("rope_type"))
        if kind != "yarn":
            raise fail("rope_scaling", f"type {kind!r} is not implemented (only 'yarn')")
        for k in _YARN_KEYS:
            v = rs.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"model.rope_scaling.{k}={v!r}: must be a positive number")
    for key, value in (("max_num_seqs", max_num_seqs), ("max_seq_len", max_seq_len)):
        if not _is_int(value) or value <= 0:
            raise ConfigError(f"model.{key}={value!r}: must be a positive integer")
    if max_seq_len > hf["max_position_embeddings"]:
        raise ConfigError(
            f"model.max_seq_len={max_seq_len}: must be <= max_position_embeddings="
            f"{hf['max_position_embeddings']}"
        )
    return DeepseekV3Config(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        q_lora_rank=hf["q_lora_rank"],
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        n_routed_experts=hf["n_routed_experts"],
        n_shared_experts=hf["n_shared_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        n_group=hf["n_group"],
        topk_group=hf["topk_group"],
        routed_scaling_factor=float(hf["routed_scaling_factor"]),
        norm_topk_prob=hf["norm_topk_prob"],
        first_k_dense_replace=hf["first_k_dense_replace"],
        moe_layer_freq=hf["moe_layer_freq"],
        rms_norm_eps=float(hf["rms_norm_eps"]),
        rope_theta=float(hf["rope_theta"]),
        rope_scaling=dict(rs) if rs is not None else None,
        max_position_embeddings=hf["max_position_embeddings"],
        max_num_seqs=max_num_seqs,
        max_seq_len=max_seq_len,
        hf=hf,
    )
