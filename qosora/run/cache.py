"""The KV cache of one batch in flight, held as onnxruntime OrtValues on the session's device and bound with IO
binding: it never goes through numpy between steps.

    ConcatCache        (standard contract)  past [B, Hkv, P, D] -> present = Concat(past, new) [B, Hkv, P + S, D]
                       The graph grows the cache, so the present outputs are left to onnxruntime to allocate on the
                       device and fed back as the next step's past (the Concat inside the graph is the only copy).
    SharedBufferCache  (gqa contract)       one buffer [B, Hkv, L, D] per name, L = the longest total length of
                       the batch, bound as both past_key_values.{i}.* and present.{i}.*: GroupQueryAttention writes
                       the new rows in place (at seqlens_k) and reads rows [0, seqlens_k] of each sequence.

Both bind the cache after the logits output, so a run's outputs are [logits, *present in `io.past_names` order].
The mask of the batch is `Mask`: one row of ones per sequence, [lo_b, hi_b), preallocated once.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from qosora.run.session import GraphIO


class ConcatCache:
    def __init__(self, io: GraphIO, batch: int):
        self.io = io
        empty = (batch, io.num_kv_heads, 0, io.head_dim)
        self.past = [ort.OrtValue.ortvalue_from_shape_and_type(empty, io.cache_dtype, io.device, 0)
                     for _ in io.past_names]

    def bind(self, binding: ort.IOBinding) -> None:
        """Every step: the last presents become the pasts, fresh presents are allocated on the device."""
        for (past, present), value in zip(self.io.past_names, self.past):
            binding.bind_ortvalue_input(past, value)
            binding.bind_output(present, self.io.device)

    def update(self, outputs: list) -> None:
        self.past = outputs[1:]


class SharedBufferCache:
    def __init__(self, io: GraphIO, batch: int, length: int):
        self.io, self.bound = io, False
        shape = (batch, io.num_kv_heads, length, io.head_dim)
        # Uninitialized on purpose: GroupQueryAttention reads only rows it wrote (below seqlens_k + 1 per sequence).
        self.buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, io.cache_dtype, io.device, 0)
                        for _ in io.past_names]

    def bind(self, binding: ort.IOBinding) -> None:
        """Once: the same OrtValue is past and present, so nothing changes between steps."""
        if self.bound:
            return
        for (past, present), value in zip(self.io.past_names, self.buffers):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.bound = True

    def update(self, outputs: list) -> None:
        pass


class Mask:
    """attention_mask [B, T] int64: row b is 1 on columns [lo_b, hi_b), 0 elsewhere.

    Left padding (standard): lo_b = pad_b, hi_b = T for every running row. Right padding (gqa): lo_b = 0, hi_b =
    the row's length, so sum(mask) - 1 is its newest position. A finished row keeps its hi_b: its positions stop
    advancing (no rotary position past the context) and its outputs are ignored.

    One buffer of B * L int64 is allocated once. Batch 1 binds a view of it (all ones, no work per step); a batch
    needs its rows at stride T, so it refills B * T int64 per step with one vectorized compare (a few kB).
    """

    def __init__(self, lo: np.ndarray, hi: np.ndarray, length: int):
        self.lo, self.hi = lo.astype(np.int64), hi.astype(np.int64)
        b = len(lo)
        self.flat = np.ones(b * length, np.int64)
        self.columns = np.arange(length, dtype=np.int64)
        self.rows_are_full = b == 1 and int(self.lo[0]) == 0

    def view(self, width: int) -> np.ndarray:
        b = len(self.lo)
        m = self.flat[: b * width].reshape(b, width)
        if not self.rows_are_full:
            cols = self.columns[:width]
            np.logical_and(cols >= self.lo[:, None], cols < self.hi[:, None], out=m, casting="unsafe")
        return m
