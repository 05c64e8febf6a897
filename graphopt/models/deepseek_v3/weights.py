"""DeepSeek-V3 weights: seeded random init, or HF safetensors under HF parameter names.

The Paddle Layer's structured names equal HF's (``model.layers.0.self_attn.kv_b_proj.weight``),
with two layout differences handled here: Linear weights (and the router's ``gate.weight``) are
``[in, out]`` in Paddle but ``[out, in]`` in HF, and routed experts are stacked per layer in
Paddle (``mlp.experts.gate_proj`` [E, in, out]) but separate in HF
(``mlp.experts.{e}.gate_proj.weight`` [out, in]).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from graphopt.errors import ConfigError
from graphopt.models.deepseek_v3.modeling import (
    DeepseekV3Experts,
    DeepseekV3ForCausalLM,
    MoEGate,
    RMSNorm,
)

#: How many names an error message lists before "(+N more)".
_LIST_FIRST = 5


@dataclass(frozen=True)
class HFTensor:
    """Where one HF checkpoint tensor lives in the Paddle Layer."""

    param: paddle.Tensor
    #: the tensor's shape in the HF checkpoint
    hf_shape: tuple[int, ...]
    #: HF stores it transposed ([out, in]) relative to the Paddle parameter
    transpose: bool
    #: index into a stacked expert parameter, or None for a whole parameter
    expert: int | None = None

    def to_hf(self) -> np.ndarray:
        """The HF-layout array of this tensor's current value."""
        value = self.param.numpy()
        if self.expert is not None:
            value = value[self.expert]
        return np.ascontiguousarray(value.T if self.transpose else value)

    def paddle_value(self, hf_value: np.ndarray) -> np.ndarray:
        """An HF-layout array in the Paddle parameter's layout (one expert's slice if stacked)."""
        value = np.asarray(hf_value, dtype=np.float32)
        return value.T if self.transpose else value


def hf_tensors(layer: DeepseekV3ForCausalLM) -> dict[str, HFTensor]:
    """Every tensor a HF DeepSeek-V3 checkpoint has for this model, by HF name."""
    out: dict[str, HFTensor] = {}
    for prefix, sub in layer.named_sublayers():
        if isinstance(sub, paddle.nn.Linear):
            w = sub.weight
            out[f"{prefix}.weight"] = HFTensor(w, (w.shape[1], w.shape[0]), transpose=True)
        elif isinstance(sub, (RMSNorm, paddle.nn.Embedding)):
            out[f"{prefix}.weight"] = HFTensor(sub.weight, tuple(sub.weight.shape), transpose=False)
        elif isinstance(sub, MoEGate):
            w, b = sub.weight, sub.e_score_correction_bias
            out[f"{prefix}.weight"] = HFTensor(w, (w.shape[1], w.shape[0]), transpose=True)
            out[f"{prefix}.e_score_correction_bias"] = HFTensor(b, tuple(b.shape), transpose=False)
        elif isinstance(sub, DeepseekV3Experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                p = getattr(sub, proj)
                for e in range(p.shape[0]):
                    out[f"{prefix}.{e}.{proj}.weight"] = HFTensor(
                        p, (p.shape[2], p.shape[1]), transpose=True, expert=e
                    )
    return out


def _set(param: paddle.Tensor, value: np.ndarray) -> None:
    param.set_value(np.ascontiguousarray(value, dtype=np.float32))


def init_random_weights(layer: DeepseekV3ForCausalLM, seed: int) -> None:
    """Deterministic random weights for ``seed``: normal(0, initializer_range) everywhere,
    RMSNorm weights 1 (so activations stay O(1) through many layers and logits stay finite)."""
    std = float(layer.config.hf.get("initializer_range", 0.02))
    rng = np.random.default_rng(seed)
    # named_parameters() follows construction order, so the draw order is fixed for a config.
    for name, param in layer.named_parameters():
        if name.endswith("norm.weight"):  # every RMSNorm (input_/q_a_/kv_a_layernorm, norm)
            _set(param, np.ones(param.shape, dtype=np.float32))
        else:
            _set(param, rng.normal(0.0, std, size=param.shape).astype(np.float32))


def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"model.weights {str(path)!r}: no *.safetensors files in directory")
        return files
    if not path.is_file():
        raise ConfigError(f"model.weights {str(path)!r}: no such file or directory")
    return [path]


def _listing(names: list[str], what: str) -> str:
    more = f" (+{len(names) - _LIST_FIRST} more)" if len(names) > _LIST_FIRST else ""
    return f"{len(names)} {what}: {', '.join(names[:_LIST_FIRST])}{more}"


def _is_mtp_tensor(name: str, num_layers: int, num_mtp: int) -> bool:
    """DeepSeek-V3 checkpoints append the multi-token-prediction module as layer ``num_layers``;
    it is not part of the decoder step, so its tensors are skipped, not reported as unexpected."""
    if not name.startswith("model.layers."):
        return False
    idx = name.split(".")[2]
    return idx.isdigit() and num_layers <= int(idx) < num_layers + num_mtp


#: safetensors dtypes a float32 parameter is loaded from (others would be silently converted)
FLOAT_DTYPES = ("F16", "F32", "F64")


def _open_all(files: list[Path]) -> Iterator[tuple[Path, str, tuple[int, ...], str]]:
    """(file, tensor name, shape, safetensors dtype) for every tensor, reading headers only."""
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    part = handle.get_slice(key)
                    yield f, key, tuple(part.get_shape()), str(part.get_dtype())
        except (SafetensorError, OSError) as e:
            raise ConfigError(
                f"model.weights {str(f)!r}: not a readable safetensors file ({e})"
            ) from None


def load_hf_safetensors(layer: DeepseekV3ForCausalLM, path: str | Path) -> None:
    """Load a HF DeepSeek-V3 checkpoint (one ``.safetensors`` file or a directory of them).

    Every expected tensor must be present exactly once with its HF shape; anything missing,
    unexpected or mis-shaped is reported in one ConfigError (first few names + counts) before
    any parameter is touched.
    """
    path = Path(path)
    expected = hf_tensors(layer)
    num_layers = layer.config.num_hidden_layers
    num_mtp = int(layer.config.hf.get("num_nextn_predict_layers", 0) or 0)
    where: dict[str, Path] = {}
    unexpected: list[str] = []
    misshaped: list[str] = []
    wrong_dtype: list[str] = []
    duplicated: list[str] = []
    for f, key, shape, dtype in _open_all(_checkpoint_files(path)):
        if key not in expected:
            if not _is_mtp_tensor(key, num_layers, num_mtp):
                unexpected.append(key)
            continue
        if key in where:
            duplicated.append(f"{key} ({where[key].name}, {f.name})")
        where[key] = f
        if shape != expected[key].hf_shape:
            misshaped.append(f"{key} {list(shape)} != {list(expected[key].hf_shape)}")
        if dtype not in FLOAT_DTYPES:
            wrong_dtype.append(f"{key} {dtype}")
    missing = [k for k in expected if k not in where]
    problems = [
        _listing(names, what)
        for names, what in (
            (missing, "missing"),
            (unexpected, "unexpected"),
            (duplicated, "in more than one file"),
            (misshaped, "mis-shaped (got != expected)"),
            (wrong_dtype, f"not floating point (expected one of {', '.join(FLOAT_DTYPES)})"),
        )
        if names
    ]
    if problems:
        raise ConfigError(f"model.weights {str(path)!r}: " + "; ".join(problems))

    # Everything is read before any parameter is set: a tensor that fails to read leaves the
    # model as it was.
    stacked: dict[int, np.ndarray] = {}  # id(param) -> stacked value being assembled
    single: list[tuple[paddle.Tensor, np.ndarray]] = []
    for f in sorted(set(where.values())):
        with safe_open(str(f), framework="numpy") as handle:
            for key in (k for k, src in where.items() if src == f):
                slot = expected[key]
                try:
                    raw = handle.get_tensor(key)
                except (SafetensorError, TypeError, ValueError) as e:
                    # e.g. bf16 / fp8 tensors: numpy has no such dtype.
                    raise ConfigError(
                        f"model.weights {str(f)!r}: cannot read {key} as numpy ({e})"
                    ) from None
                value = slot.paddle_value(raw)
                if slot.expert is None:
                    single.append((slot.param, value))
                else:
                    if id(slot.param) not in stacked:  # one copy per stacked parameter
                        stacked[id(slot.param)] = slot.param.numpy()
                    stacked[id(slot.param)][slot.expert] = value
    for param, value in single:
        _set(param, value)
    params = {id(s.param): s.param for s in expected.values()}
    for pid, value in stacked.items():
        _set(params[pid], value)


def save_hf_safetensors(layer: DeepseekV3ForCausalLM, path: str | Path) -> None:
    """Write the Layer's weights as one HF-format ``.safetensors`` file (for tests, round trips)."""
    save_file({name: t.to_hf() for name, t in hf_tensors(layer).items()}, str(path))
