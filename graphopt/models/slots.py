"""The model contract's reusable half: a FastDeploy-style forward meta, slot caches, batches.

A model written the FastDeploy way takes ``forward(input_ids, positions, forward_meta)`` and
returns ``(logits, *new_caches)``. :func:`slot_model_bundle` turns such a Layer into a
:class:`graphopt.models.base.ModelBundle` (batches, padding, random steps, state commits), so a
user writes only the Layer and a short ``build`` function (see ``examples/byo_model``).

One :class:`ForwardMeta` object lives as long as the model; every batch refills its fields:

* ``max_len_tensor_cpu``: int32 [3] on ``paddle.CPUPlace()``: ``[0]`` max total length (cached
  + new) over the step's sequences, ``[1]`` max new tokens of a prefill sequence (0 if none),
  ``[2]`` max total length of a decode sequence (0 if none) -- FastDeploy's encoder / decoder
  maxima;
* ``seq_lens_encoder`` / ``seq_lens_decoder`` / ``seq_lens_this_time`` (int32 [max_num_seqs],
  one entry per cache slot, 0 for an empty slot): prompt tokens of a prefill sequence this step,
  tokens already cached, tokens this step -- FastDeploy's names and meanings;
* ``slot_ids`` (int64 [T], FastDeploy's ``batch_id_per_token``) and ``position_ids`` (int64
  [T]): each token's cache slot and position; padding tokens use the scratch slot
  ``max_num_seqs``, which no real token reads or writes;
* ``is_prefill`` / ``is_decode`` (float32 [T]): per-token branch masks, both 0 for padding;
* ``caches``: one latent cache per layer, ``[max_num_seqs + 1, max_seq_len, width]``.

A sequence is a *decode* sequence when it brings exactly one new token on top of a non-empty
cache; every other sequence (new, or a chunk on top of a cache) is a *prefill* sequence.

The rules a model and its batches keep (graphopt's verification relies on them):

1. **One meta object, updated in place.** SOT guards on object identity: a new meta object per
   step retraces the whole model. Fixed-shape fields (``max_len_tensor_cpu``, ``seq_lens_*``,
   caches) are updated in place; per-token fields change shape with T and are reassigned. The
   runtime reads every meta tensor by value each step, so replacing a tensor works too.
2. **Padding changes nothing real.** A batch padded to a capture size appends tokens that
   belong to no sequence: both masks 0, the scratch slot, ``seq_lens_*`` and
   ``max_len_tensor_cpu`` unchanged. The model must write caches with :func:`write_cache` (a
   masked write), so padding leaves every cache row, the scratch slot's included, as it was,
   and the real tokens' outputs do not depend on the padding.
3. **Unpadded, then padded.** Building or padding a batch refills the shared meta; reading
   ``batch.meta`` re-binds the meta to that batch (see :class:`SlotStepBatch`), so an older
   batch stays valid after newer ones were built or padded, in any order.
4. **No token count baked in.** The step is traced once and runs at every token count, so
   token-sized shapes must be computed when the program runs: ``-1`` in reshapes,
   ``paddle.zeros_like(x)`` or ``paddle.shape(x)`` -- not ``x.shape[0]``, which SOT turns
   into the traced batch's number. Verification reports a step that breaks this rule.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paddle

from graphopt.models.base import BATCH_KINDS, ModelBundle, StepBatch

#: per-slot fields, FastDeploy's names (updated in place: their shape never changes)
SEQ_LEN_FIELDS = ("seq_lens_encoder", "seq_lens_decoder", "seq_lens_this_time")
#: per-token fields (reassigned: their shape is the step's token count)
TOKEN_FIELDS = ("slot_ids", "position_ids", "is_prefill", "is_decode")


class ForwardMeta:
    """The one forward-meta object a model reads besides its tensor arguments."""

    def __init__(self, caches: list[paddle.Tensor]) -> None:
        self.max_len_tensor_cpu = paddle.to_tensor(
            np.zeros([3], dtype=np.int32), place=paddle.CPUPlace()
        )
        num_slots = caches[0].shape[0] - 1 if caches else 0
        for name in SEQ_LEN_FIELDS:
            setattr(self, name, paddle.zeros([num_slots], dtype="int32"))
        self.slot_ids = paddle.zeros([0], dtype="int64")
        self.position_ids = paddle.zeros([0], dtype="int64")
        self.is_prefill = paddle.zeros([0], dtype="float32")
        self.is_decode = paddle.zeros([0], dtype="float32")
        self.caches = caches
        #: serial number of the SlotStepBatch whose fields the meta holds now (None: none yet).
        self.bound_batch: int | None = None
        #: what the serving engine's runner computes from the fields before each step (e.g.
        #: FastDeploy's ``needs_prefill`` flags); called after every batch fills the meta
        self.prepare: Callable[[ForwardMeta], None] | None = None


_BATCH_SERIALS = itertools.count()


@dataclass
class SlotStepBatch(StepBatch):
    """A :class:`StepBatch` that also knows its cache slots and how many tokens are padding.

    Reading ``batch.meta`` first binds the shared meta to this batch (its per-token tensors and
    host values), so ``layer(*batch.args, batch.meta)`` and feeds built from ``batch.meta`` are
    always this batch's step, even after other batches were built. Binding is skipped when the
    meta already holds this batch, so edits made to it since (e.g. a test forcing a stale
    ``max_len_tensor_cpu``) are kept.
    """

    slots: list[int] = field(default_factory=list)
    num_padding: int = 0
    #: host copies of the per-token meta fields (TOKEN_FIELDS), of the per-sequence lengths
    #: (SEQ_LEN_FIELDS) and of the max_len_tensor_cpu values ("max_len").
    token_fields: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._serial = next(_BATCH_SERIALS)
        self._device_fields = {k: paddle.to_tensor(self.token_fields[k]) for k in TOKEN_FIELDS}

    @property  # type: ignore[override]
    def meta(self) -> Any:
        """The shared forward meta, bound to this batch."""
        self.apply()
        return self._meta

    @meta.setter
    def meta(self, value: Any) -> None:
        self._meta = value

    @property
    def num_tokens(self) -> int:
        """All tokens of the step, padding included (= ``args[0].shape[0]``)."""
        return int(sum(self.seq_lens)) + self.num_padding

    @property
    def num_real_tokens(self) -> int:
        """Tokens that belong to a sequence; they come first, padding after."""
        return int(sum(self.seq_lens))

    def apply(self) -> None:
        """Fill the shared meta with this batch's fields (no-op if it holds them already)."""
        meta = self._meta
        if meta.bound_batch == self._serial:
            return
        for name, tensor in self._device_fields.items():
            setattr(meta, name, tensor)
        # In place: a traced program may have bound these tensors by reference.
        meta.max_len_tensor_cpu.set_value(self.token_fields["max_len"])
        for name in SEQ_LEN_FIELDS:
            getattr(meta, name).set_value(self.token_fields[name])
        if meta.prepare is not None:
            meta.prepare(meta)
        meta.bound_batch = self._serial


class SlotBatcher:
    """Builds steps for one model: fills its :class:`ForwardMeta` and returns the step args."""

    def __init__(
        self,
        meta: ForwardMeta,
        vocab_size: int,
        max_num_seqs: int,
        max_seq_len: int,
        max_prefill_len: int = 16,
    ) -> None:
        self.meta = meta
        self.vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs
        self.max_seq_len = max_seq_len
        #: longest new-sequence prompt random_batch draws (keeps random steps cheap).
        self.max_prefill_len = max(1, min(max_prefill_len, max_seq_len))

    @property
    def scratch_slot(self) -> int:
        """The extra cache slot padding tokens write to."""
        return self.max_num_seqs

    def default_token_ids(self, slots: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """Deterministic token ids, a function of (slot, position) only.

        So a sequence fed in one prefill or token by token sees the same tokens, which is what
        the decode-equals-prefill checks need.
        """
        s = np.asarray(slots, dtype=np.int64)
        p = np.asarray(positions, dtype=np.int64)
        return (s * 7919 + p * 104729 + 17) % self.vocab_size

    def make_batch(
        self,
        kind: str,
        seq_lens: Sequence[int],
        cached_lens: Sequence[int],
        slots: Sequence[int] | None = None,
        input_ids: Sequence[int] | np.ndarray | None = None,
    ) -> SlotStepBatch:
        """One step: ``seq_lens[i]`` new tokens for the sequence in ``slots[i]`` whose cache
        already holds ``cached_lens[i]`` tokens. ``kind`` must match the sequences (see module
        doc); ``slots`` default to ``0..n-1``; ``input_ids`` default to
        :meth:`default_token_ids`."""
        seq_lens = [int(n) for n in seq_lens]
        cached_lens = [int(c) for c in cached_lens]
        n = len(seq_lens)
        slots = list(range(n)) if slots is None else [int(s) for s in slots]
        if kind not in BATCH_KINDS:
            raise ValueError(f"batch kind {kind!r}: choose one of {', '.join(BATCH_KINDS)}")
        if not 0 < n <= self.max_num_seqs or len(cached_lens) != n or len(slots) != n:
            raise ValueError(
                f"need 1..{self.max_num_seqs} sequences with one seq_len, cached_len and slot "
                f"each (got {n}, {len(cached_lens)}, {len(slots)})"
            )
        if len(set(slots)) != n or not all(0 <= s < self.max_num_seqs for s in slots):
            raise ValueError(f"slots {slots} must be distinct and in [0, {self.max_num_seqs})")
        for new, cached in zip(seq_lens, cached_lens, strict=True):
            if new < 1 or cached < 0 or new + cached > self.max_seq_len:
                raise ValueError(
                    f"sequence with {cached} cached + {new} new tokens does not fit "
                    f"max_seq_len={self.max_seq_len}"
                )
        decode = [
            new == 1 and cached > 0 for new, cached in zip(seq_lens, cached_lens, strict=True)
        ]
        has_decode, has_prefill = any(decode), not all(decode)
        expected = {"prefill": (True, False), "decode": (False, True), "mixed": (True, True)}[kind]
        if (has_prefill, has_decode) != expected:
            raise ValueError(
                f"a {kind} batch needs prefill sequences: {expected[0]}, decode sequences: "
                f"{expected[1]} (a decode sequence has 1 new token and cached_len > 0)"
            )

        positions = np.concatenate(
            [
                np.arange(c, c + s, dtype=np.int64)
                for s, c in zip(seq_lens, cached_lens, strict=True)
            ]
        )
        token_slots = np.repeat(np.asarray(slots, dtype=np.int64), seq_lens)
        token_decode = np.repeat(np.asarray(decode, dtype=np.float32), seq_lens)
        if input_ids is None:
            ids = self.default_token_ids(token_slots, positions)
        else:
            ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
            if ids.shape[0] != positions.shape[0]:
                raise ValueError(f"{ids.shape[0]} input_ids for {positions.shape[0]} tokens")
        max_len = np.array(
            [
                max(s + c for s, c in zip(seq_lens, cached_lens, strict=True)),
                max([s for s, d in zip(seq_lens, decode, strict=True) if not d], default=0),
                max(
                    [s + c for s, c, d in zip(seq_lens, cached_lens, decode, strict=True) if d],
                    default=0,
                ),
            ],
            dtype=np.int32,
        )
        batch = SlotStepBatch(
            kind=kind,
            args=(paddle.to_tensor(ids), paddle.to_tensor(positions)),
            meta=self.meta,
            seq_lens=seq_lens,
            cached_lens=cached_lens,
            slots=slots,
            token_fields={
                "slot_ids": token_slots,
                "position_ids": positions,
                "is_prefill": 1.0 - token_decode,
                "is_decode": token_decode,
                "max_len": max_len,
                **self._seq_lens(slots, seq_lens, cached_lens, decode),
            },
        )
        batch.apply()
        return batch

    def _seq_lens(self, slots: Sequence[int], seq_lens: Sequence[int], cached_lens: Sequence[int],
                  decode: Sequence[bool]) -> dict[str, np.ndarray]:
        """FastDeploy's per-slot lengths: prompt tokens (prefill), cached tokens, this step's."""
        out = {name: np.zeros([self.max_num_seqs], dtype=np.int32) for name in SEQ_LEN_FIELDS}
        for slot, new, cached, dec in zip(slots, seq_lens, cached_lens, decode, strict=True):
            out["seq_lens_encoder"][slot] = 0 if dec else new
            out["seq_lens_decoder"][slot] = cached
            out["seq_lens_this_time"][slot] = new
        return out

    def random_batch(self, rng: np.random.Generator, kind: str) -> SlotStepBatch:
        """A valid random step of ``kind`` over whatever the cache holds now.

        Decode sequences get random cached lengths in ``[1, max_seq_len)`` and attend over the
        cache rows already there (zeros after :meth:`reset_state`, or rows earlier steps wrote).
        This keeps steps independent (no bookkeeping of per-slot lengths), and is deterministic
        given the cache contents: to compare two executions of a random step, run both on the
        same cache tensors (same starting state), not one after the other with committed state.
        """
        if kind not in BATCH_KINDS:
            raise ValueError(f"batch kind {kind!r}: choose one of {', '.join(BATCH_KINDS)}")
        lo = 2 if kind == "mixed" else 1
        if self.max_num_seqs < lo or (kind != "prefill" and self.max_seq_len < 2):
            raise ValueError(f"max_num_seqs/max_seq_len too small for a {kind} batch")
        n = int(rng.integers(lo, self.max_num_seqs + 1))
        n_decode = {"prefill": 0, "decode": n}.get(kind)
        if n_decode is None:  # mixed: at least one decode and one prefill sequence
            n_decode = int(rng.integers(1, n))
        seq_lens, cached_lens = [], []
        for i in range(n):
            if i < n_decode:
                seq_lens.append(1)
                cached_lens.append(int(rng.integers(1, self.max_seq_len)))
            else:
                seq_lens.append(int(rng.integers(1, self.max_prefill_len + 1)))
                cached_lens.append(0)
        order = rng.permutation(n)  # interleave decode and prefill sequences
        seq_lens = [seq_lens[i] for i in order]
        cached_lens = [cached_lens[i] for i in order]
        slots = [int(s) for s in rng.choice(self.max_num_seqs, size=n, replace=False)]
        ids = rng.integers(0, self.vocab_size, size=sum(seq_lens), dtype=np.int64)
        return self.make_batch(kind, seq_lens, cached_lens, slots=slots, input_ids=ids)

    def pad_batch(self, batch: StepBatch, num_tokens: int) -> SlotStepBatch:
        """``batch`` plus padding tokens up to ``num_tokens``, appended after the real ones.

        Padding tokens point at the scratch slot (which no real token writes), have both
        branch masks 0 and leave ``max_len_tensor_cpu`` as it is: no real output changes, and
        the returned caches are those of the unpadded step (padding writes rows back unchanged,
        see :func:`write_cache`).
        """
        if not isinstance(batch, SlotStepBatch):
            raise TypeError("pad_batch needs a batch built by this model's make_batch")
        real = batch.num_real_tokens
        if num_tokens < real:
            raise ValueError(f"cannot pad a {real}-token batch down to {num_tokens} tokens")
        pad = num_tokens - real
        ids, positions = (a.numpy()[:real] for a in batch.args[:2])
        pad_ids = np.zeros([pad], dtype=np.int64)  # token 0 at position 0: any value works
        f = batch.token_fields
        zeros = np.zeros([pad], dtype=np.float32)
        padded = SlotStepBatch(
            kind=batch.kind,
            args=(
                paddle.to_tensor(np.concatenate([ids, pad_ids])),
                paddle.to_tensor(np.concatenate([positions, pad_ids])),
            ),
            meta=self.meta,
            seq_lens=list(batch.seq_lens),
            cached_lens=list(batch.cached_lens),
            slots=list(batch.slots),
            num_padding=pad,
            token_fields={
                "slot_ids": np.concatenate(
                    [f["slot_ids"][:real], np.full([pad], self.scratch_slot, dtype=np.int64)]
                ),
                "position_ids": np.concatenate([f["position_ids"][:real], pad_ids]),
                "is_prefill": np.concatenate([f["is_prefill"][:real], zeros]),
                "is_decode": np.concatenate([f["is_decode"][:real], zeros]),
                "max_len": f["max_len"].copy(),
                **{name: f[name].copy() for name in SEQ_LEN_FIELDS},
            },
        )
        padded.apply()
        return padded

    def reset_state(self) -> None:
        """Zero every cache in place (fresh sequences; tensor identity kept for SOT)."""
        for cache in self.meta.caches:
            cache.set_value(np.zeros(cache.shape, dtype=np.float32))


def slot_model_bundle(
    name: str,
    layer: Any,
    config: Any = None,
    *,
    num_layers: int | None = None,
    cache_width: int | None = None,
    max_num_seqs: int | None = None,
    max_seq_len: int | None = None,
    vocab_size: int | None = None,
    max_prefill_len: int = 16,
    host_inputs: Sequence[str] = ("max_len_tensor_cpu",),
    prepare_meta: Callable[[ForwardMeta], None] | None = None,
) -> ModelBundle:
    """A ModelBundle for a Layer with one slot cache per layer (the model contract's glue).

    Sizes come as keywords or from `config`'s attributes (``num_hidden_layers``,
    ``latent_dim`` = the cache row width, ``max_num_seqs``, ``max_seq_len``, ``vocab_size``);
    a keyword wins. The Layer's ``forward(input_ids, positions, forward_meta)`` returns
    ``(logits, *new_caches)``. `host_inputs` name the meta fields that live on the host and
    change every step; `prepare_meta(meta)` runs after each batch fills the meta, as a serving
    engine's runner does before launching a step.
    """

    def size(value: int | None, attr: str) -> int:
        if value is None:
            value = getattr(config, attr, None)
        if not isinstance(value, int) or value <= 0:
            raise TypeError(f"slot_model_bundle needs a positive {attr}, got {value!r}")
        return value

    layers = size(num_layers, "num_hidden_layers")
    slots, seq_len = size(max_num_seqs, "max_num_seqs"), size(max_seq_len, "max_seq_len")
    meta = ForwardMeta(new_caches(layers, slots, seq_len, size(cache_width, "latent_dim")))
    meta.prepare = prepare_meta
    batcher = SlotBatcher(meta, size(vocab_size, "vocab_size"), slots, seq_len,
                          max_prefill_len=max_prefill_len)
    return ModelBundle(
        name=name,
        layer=layer,
        meta=meta,
        host_inputs=tuple(host_inputs),
        state_fields=tuple(f"caches.{i}" for i in range(layers)),
        make_batch=batcher.make_batch,
        random_batch=batcher.random_batch,
        reset_state=batcher.reset_state,
        pad_batch=batcher.pad_batch,
        config=config,
    )


def new_caches(
    num_layers: int, max_num_seqs: int, max_seq_len: int, width: int
) -> list[paddle.Tensor]:
    """Zeroed latent caches, one per layer, with the scratch slot at index ``max_num_seqs``."""
    return [
        paddle.zeros([max_num_seqs + 1, max_seq_len, width], dtype="float32")
        for _ in range(num_layers)
    ]


def step_attention_inputs(
    positions: paddle.Tensor, forward_meta: ForwardMeta, max_seq_len: int
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """Per-step attention inputs shared by every layer, computed once on the device.

    Returns ``(write_index, slot_ids, attn_bias, prefill_mask, decode_mask)``: the flat cache
    row each token writes (``slot * max_seq_len + position``), its slot, an additive [T, 1, S]
    bias that lets the token at position p see cache rows 0..p of its slot, and the [T, 1]
    branch masks. Computed outside the attention Layer so the Layer's (possibly AST-converted)
    forward takes them as tensor arguments instead of reading meta tensors itself.
    """
    slot_ids = forward_meta.slot_ids
    write_index = slot_ids * max_seq_len + positions
    rows = paddle.arange(max_seq_len, dtype="int64").unsqueeze(0)  # [1, S]
    visible = rows <= positions.unsqueeze(-1)  # [T, S]
    # -inf would give NaN for a row with nothing visible; -1e30 underflows to 0 after softmax.
    attn_bias = paddle.where(
        visible,
        paddle.zeros_like(visible, dtype="float32"),
        paddle.full_like(visible, -1e30, dtype="float32"),
    ).unsqueeze(1)
    prefill_mask = forward_meta.is_prefill.unsqueeze(-1)
    decode_mask = forward_meta.is_decode.unsqueeze(-1)
    return write_index, slot_ids, attn_bias, prefill_mask, decode_mask


def write_cache(
    cache: paddle.Tensor,
    write_index: paddle.Tensor,
    rows: paddle.Tensor,
    token_mask: paddle.Tensor,
    seq_len: int,
    width: int,
) -> paddle.Tensor:
    """A new [slots, seq_len, width] cache with ``rows`` [T, width] written at flat rows
    ``write_index`` (functional: the step returns it, the runtime commits it).

    Tokens whose ``token_mask`` [T, 1] is 0 (padding) write back the row that is already there,
    so padding leaves the whole state bit-identical, scratch slot included: a padded step and
    the unpadded one return equal caches. (Blending with a 0/1 mask is exact for finite rows.)
    """
    flat = cache.reshape([-1, width])
    old = paddle.gather(flat, write_index)
    rows = rows * token_mask + old * (1.0 - token_mask)
    return paddle.scatter(flat, write_index, rows, overwrite=True).reshape([-1, seq_len, width])
