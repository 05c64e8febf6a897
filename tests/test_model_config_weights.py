"""DeepSeek-V3 HF config (read, override, validate, round trip) and safetensors weights."""

from __future__ import annotations

import os
import re

os.environ.setdefault("GLOG_minloglevel", "2")

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from safetensors.numpy import load_file, save_file

from graphopt.errors import ConfigError
from graphopt.models import build_model
from graphopt.models.deepseek_v3.config import SHIPPED_CONFIG_JSON, resolve_config, write_hf_config
from graphopt.models.deepseek_v3.weights import hf_tensors, save_hf_safetensors
from tests.conftest import compose_cfg


def dsv3_cfg(**overrides):
    """The default dsv3 model node as the builder gets it, with keys replaced."""
    cfg = OmegaConf.to_container(compose_cfg("model=dsv3").model)
    cfg.update(overrides)
    return cfg


def small_cfg(**overrides):
    """Two layers (one dense, one MoE): fast to build, covers every tensor kind."""
    return dsv3_cfg(num_hidden_layers=2, **overrides)


# -- config ---------------------------------------------------------------------------------


def test_shipped_config_is_deepseek_v3():
    hf = json.loads(SHIPPED_CONFIG_JSON.read_text())
    # fmt: off
    expected = {
        "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "first_k_dense_replace": 3, "n_routed_experts": 256,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 10000, "vocab_size": 129280,
    }
    assert {k: hf[k] for k in expected} == expected
    assert hf["rope_scaling"] == {
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn",
    }
    # fmt: on
    # the real config validates as is (no overrides)
    full = resolve_config({"name": "dsv3", "family": "deepseek_v3"})
    assert full.num_hidden_layers == 61 and full.latent_dim == 576


def test_overrides_apply_and_softmax_scale_has_yarn_mscale():
    cfg = resolve_config(dsv3_cfg())
    assert cfg.hidden_size == 256 and cfg.n_routed_experts == 8
    assert cfg.hf["model_type"] == "deepseek_v3"  # untouched fields survive
    mscale = 0.1 * 1.0 * np.log(40) + 1.0
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim**-0.5 * mscale**2)
    partial = resolve_config(dsv3_cfg(rope_scaling={"factor": 4}))
    assert partial.rope_scaling["factor"] == 4
    assert partial.rope_scaling["original_max_position_embeddings"] == 4096


def test_hf_config_round_trip(tmp_path):
    cfg = resolve_config(dsv3_cfg())
    path = tmp_path / "config.json"
    write_hf_config(cfg, path)
    again = resolve_config({"config_json": str(path), "max_num_seqs": 8, "max_seq_len": 64})
    assert again == cfg
    assert again.hf == cfg.hf


def _write(tmp_path: Path, hf: dict) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    return str(path)


BAD_OVERRIDES = [
    ({"hiden_size": 128}, "hiden_size", "hidden_size"),
    ({"n_group": 3}, "n_group", "n_routed_experts"),
    ({"topk_group": 5}, "topk_group", "n_group"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok", "n_routed_experts"),
    ({"num_experts_per_tok": 5, "topk_group": 2}, "num_experts_per_tok", "topk_group"),
    ({"first_k_dense_replace": 5}, "first_k_dense_replace", "num_hidden_layers"),
    ({"hidden_size": 0}, "hidden_size", "positive"),
    ({"num_attention_heads": -4}, "num_attention_heads", "positive"),
    ({"kv_lora_rank": 1.5}, "kv_lora_rank", "integer"),
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim", "even"),
    ({"rms_norm_eps": 0}, "rms_norm_eps", "positive"),
    ({"scoring_func": "softmax"}, "scoring_func", "sigmoid"),
    ({"rope_scaling": {"factor": 0}}, "rope_scaling.factor", "positive"),
    ({"max_seq_len": 0}, "max_seq_len", "positive"),
    ({"max_num_seqs": -1}, "max_num_seqs", "positive"),
]


@pytest.mark.parametrize(("overrides", "field", "hint"), BAD_OVERRIDES)
def test_bad_config_names_the_field(overrides, field, hint):
    with pytest.raises(ConfigError) as info:
        resolve_config(dsv3_cfg(**overrides))
    msg = str(info.value)
    assert f"model.{field}" in msg and hint in msg and "\n" not in msg


def test_missing_field_in_config_json(tmp_path):
    hf = json.loads(SHIPPED_CONFIG_JSON.read_text())
    del hf["kv_lora_rank"]
    with pytest.raises(ConfigError, match=r"model\.kv_lora_rank: missing from .*config\.json"):
        resolve_config({"config_json": _write(tmp_path, hf)})


def test_malformed_config_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"hidden_size": 7168,,}')
    with pytest.raises(ConfigError, match=r"broken\.json.*invalid JSON"):
        resolve_config({"config_json": str(path)})
    with pytest.raises(ConfigError, match=r"nowhere\.json.*cannot read"):
        resolve_config({"config_json": str(tmp_path / "nowhere.json")})


def test_61_layers_build_and_step_without_nan():
    bundle = build_model(dsv3_cfg(num_hidden_layers=61))
    assert len(bundle.state_fields) == 61
    logits = bundle.step(bundle.make_batch("mixed", [4, 1], [0, 6]))[0]
    assert np.isfinite(logits).all() and 0.05 < logits.std() < 5


# -- weights --------------------------------------------------------------------------------


def test_random_weights_are_seeded():
    a, b, c = (build_model(small_cfg(seed=s)) for s in (1, 1, 2))
    pa, pb, pc = (dict(m.layer.named_parameters()) for m in (a, b, c))
    name = "model.layers.1.mlp.experts.up_proj"
    np.testing.assert_array_equal(pa[name].numpy(), pb[name].numpy())
    assert not np.array_equal(pa[name].numpy(), pc[name].numpy())
    np.testing.assert_array_equal(pa["model.norm.weight"].numpy(), 1.0)


def test_hf_names_and_shapes():
    bundle = build_model(small_cfg())
    cfg = bundle.config
    shapes = {k: t.hf_shape for k, t in hf_tensors(bundle.layer).items()}
    heads = cfg.num_attention_heads
    assert shapes["model.embed_tokens.weight"] == (cfg.vocab_size, cfg.hidden_size)
    assert shapes["model.layers.0.self_attn.q_a_proj.weight"] == (cfg.q_lora_rank, cfg.hidden_size)
    assert shapes["model.layers.0.self_attn.q_a_layernorm.weight"] == (cfg.q_lora_rank,)
    assert shapes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (
        cfg.latent_dim,
        cfg.hidden_size,
    )
    assert shapes["model.layers.0.self_attn.kv_b_proj.weight"] == (
        heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
        cfg.kv_lora_rank,
    )
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (
        cfg.hidden_size,
        heads * cfg.v_head_dim,
    )
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (cfg.intermediate_size, cfg.hidden_size)
    assert shapes["model.layers.1.mlp.gate.weight"] == (cfg.n_routed_experts, cfg.hidden_size)
    assert shapes["model.layers.1.mlp.gate.e_score_correction_bias"] == (cfg.n_routed_experts,)
    assert shapes["model.layers.1.mlp.experts.7.down_proj.weight"] == (
        cfg.hidden_size,
        cfg.moe_intermediate_size,
    )
    assert shapes["model.layers.1.mlp.shared_experts.up_proj.weight"] == (
        cfg.moe_intermediate_size * cfg.n_shared_experts,
        cfg.hidden_size,
    )
    assert shapes["model.norm.weight"] == (cfg.hidden_size,)
    assert shapes["lm_head.weight"] == (cfg.vocab_size, cfg.hidden_size)


def _step_logits(bundle) -> np.ndarray:
    bundle.reset_state()
    return bundle.step(bundle.make_batch("mixed", [3, 1], [0, 2]), commit=False)[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small HF checkpoint written from a seed-1 model, plus that model's logits."""
    src = build_model(small_cfg(seed=1))
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_hf_safetensors(src.layer, path)
    return path, _step_logits(src), {k: v.numpy() for k, v in src.layer.named_parameters()}


def test_safetensors_round_trip_file_and_directory(checkpoint, tmp_path):
    path, logits, params = checkpoint
    loaded = build_model(small_cfg(seed=2, weights=str(path)))
    for name, value in loaded.layer.named_parameters():
        np.testing.assert_array_equal(value.numpy(), params[name])
    np.testing.assert_array_equal(_step_logits(loaded), logits)
    # a sharded directory (two files), as HF checkpoints come
    tensors = load_file(str(path))
    names = sorted(tensors)
    save_file(
        {k: tensors[k] for k in names[::2]}, str(tmp_path / "model-00001-of-00002.safetensors")
    )
    save_file(
        {k: tensors[k] for k in names[1::2]}, str(tmp_path / "model-00002-of-00002.safetensors")
    )
    sharded = build_model(small_cfg(seed=3, weights=str(tmp_path)))
    np.testing.assert_array_equal(_step_logits(sharded), logits)


def test_a_tensor_in_two_shards_is_refused(checkpoint, tmp_path):
    """Two shards holding one tensor: which one wins would be an accident of file order."""
    tensors = load_file(str(checkpoint[0]))
    names = sorted(tensors)
    dup = names[0]
    save_file({k: tensors[k] for k in names[::2]}, str(tmp_path / "a.safetensors"))
    save_file({k: tensors[k] for k in [dup, *names[1::2]]}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ConfigError, match=rf"1 in more than one file: {re.escape(dup)} "
                                          r"\(a\.safetensors, b\.safetensors\)") as info:
        build_model(small_cfg(weights=str(tmp_path)))
    assert "\n" not in str(info.value)


def _broken(checkpoint, tmp_path, edit) -> str:
    tensors = load_file(str(checkpoint[0]))
    edit(tensors)
    out = tmp_path / "broken.safetensors"
    save_file(tensors, str(out))
    return str(out)


def test_missing_tensor(checkpoint, tmp_path):
    name = "model.layers.1.mlp.experts.3.gate_proj.weight"
    path = _broken(checkpoint, tmp_path, lambda t: t.pop(name))
    with pytest.raises(ConfigError, match=rf"1 missing: {name}") as info:
        build_model(small_cfg(weights=path))
    assert "\n" not in str(info.value)


def test_many_missing_tensors_are_summarised(checkpoint, tmp_path):
    def drop_layer_1(t):
        for k in [k for k in t if k.startswith("model.layers.1.")]:
            del t[k]

    with pytest.raises(ConfigError, match=r"\d+ missing: .*\(\+\d+ more\)"):
        build_model(small_cfg(weights=_broken(checkpoint, tmp_path, drop_layer_1)))


def test_unexpected_tensor(checkpoint, tmp_path):
    def add(t):
        t["model.layers.0.self_attn.q_proj.weight"] = np.zeros([4, 4], np.float32)

    with pytest.raises(
        ConfigError, match=r"1 unexpected: model\.layers\.0\.self_attn\.q_proj\.weight"
    ):
        build_model(small_cfg(weights=_broken(checkpoint, tmp_path, add)))


def test_misshaped_tensor(checkpoint, tmp_path):
    name = "model.layers.0.self_attn.kv_b_proj.weight"

    def transpose(t):
        t[name] = np.ascontiguousarray(t[name].T)

    with pytest.raises(ConfigError, match=rf"1 mis-shaped .*{name} \[64, 256\] != \[256, 64\]"):
        build_model(small_cfg(weights=_broken(checkpoint, tmp_path, transpose)))


def test_mtp_layer_tensors_are_skipped(checkpoint, tmp_path):
    """DeepSeek-V3 checkpoints carry the MTP module as layer num_hidden_layers: its tensors are
    skipped (no error, loaded nowhere), every real tensor is loaded, and a wrong tensor of a
    real layer still fails."""
    _, logits, params = checkpoint
    assert resolve_config(small_cfg()).hf["num_nextn_predict_layers"] == 1  # layer 2 is the MTP
    tensors = load_file(str(checkpoint[0]))
    q_a = "self_attn.q_a_proj.weight"
    mtp = {  # the MTP module's own tensors, and decoder-block names under its index (as in V3)
        "model.layers.2.eh_proj.weight": np.full([4, 4], 7.0, np.float32),
        "model.layers.2.enorm.weight": np.full([4], 7.0, np.float32),
        f"model.layers.2.{q_a}": np.full_like(tensors[f"model.layers.1.{q_a}"], 7.0),
        "model.layers.2.mlp.experts.0.gate_proj.weight": np.full_like(
            tensors["model.layers.1.mlp.experts.0.gate_proj.weight"], 7.0),
    }
    path = _broken(checkpoint, tmp_path, lambda t: t.update(mtp))
    assert set(mtp) <= set(load_file(path))

    # seed 2: a parameter the checkpoint did not set would differ from the seed-1 checkpoint
    loaded = build_model(small_cfg(seed=2, weights=path))
    got = dict(loaded.layer.named_parameters())
    assert set(got) == set(params)
    for name, value in got.items():
        np.testing.assert_array_equal(value.numpy(), params[name], err_msg=name)
    assert not any((v.numpy() == 7.0).any() for v in got.values())  # no MTP value anywhere
    np.testing.assert_array_equal(_step_logits(loaded), logits)

    # beside the MTP tensors, wrong tensors of the real layers (or past the MTP) still fail
    wrong = {"model.layers.1.eh_proj.weight": np.zeros([4, 4], np.float32),
             "model.layers.3.eh_proj.weight": np.zeros([4, 4], np.float32),
             f"model.layers.1.{q_a}": np.ascontiguousarray(tensors[f"model.layers.1.{q_a}"].T)}
    with pytest.raises(ConfigError, match=(
            r"2 unexpected: model\.layers\.1\.eh_proj\.weight, model\.layers\.3\.eh_proj\.weight; "
            rf"1 mis-shaped .*: model\.layers\.1\.{re.escape(q_a)} \[256, 64\] != \[64, 256\]$")):
        build_model(small_cfg(weights=_broken(checkpoint, tmp_path,
                                              lambda t: t.update({**mtp, **wrong}))))


def test_bad_weights_path(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        build_model(small_cfg(weights=str(tmp_path / "nope.safetensors")))
    with pytest.raises(ConfigError, match=r"no \*\.safetensors"):
        build_model(small_cfg(weights=str(tmp_path)))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        build_model(small_cfg(weights=str(junk)))
