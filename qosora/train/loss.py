"""Chunked causal-LM cross-entropy: lm_head + log-softmax a chunk of tokens at a time.

The usual `model(input_ids, labels=...)` materialises logits for every position, (B, T, V) in the compute dtype,
then an fp32 copy for the softmax and an fp32 gradient of the same size: for Llama-3-8B at T = 2048
(V = 128256) that is ~2.6 GB, more than the whole activation budget of a checkpointed 32-layer model.

Here the loss only looks at positions that have a label (prompt tokens are skipped entirely) and computes

    loss = sum_i [ logsumexp(h_i W^T) - (h_i W^T)[y_i] ]          over labelled positions i

in chunks of `chunk_size` rows, and, in the same pass, the gradient (the loss is the graph's last node):

    dL/dh_i = (softmax(h_i W^T) - onehot(y_i)) W

so peak extra memory is one (chunk_size, V) fp32 block plus dL/dh (N, d), independent of the sequence length,
and no logits are ever recomputed. The lm_head weight is
frozen in every qosora method; its gradient is computed only if it requires one.
"""

from __future__ import annotations

import torch

from qosora.train.data import IGNORE

# Rows per chunk are chosen so one chunk of logits holds about 2^25 elements (128 MiB in fp32) whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 25


def default_chunk_size(vocab_size: int) -> int:
    return max(16, CHUNK_ELEMENTS // vocab_size)


class _ChunkedLinearCE(torch.autograd.Function):
    """Forward computes the loss and, when a gradient will be needed, the gradient itself, chunk by chunk.

    The loss is the last node of the graph, so dL/dh only waits for a scalar factor (grad_out): computing it in
    the forward while the chunk's logits are at hand avoids recomputing them in the backward (the lm_head matmul,
    N x d x V, is one of the largest of the step). Only dL/dh (N, d) is kept.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, compute_dtype: torch.dtype):
        # hidden (N, d), weight (V, d), targets (N,) -> summed loss (fp32 scalar)
        w = weight.to(compute_dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = torch.arange(min(chunk_size, hidden.shape[0]), device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_size):
            h = hidden[s:s + chunk_size].to(compute_dtype)
            t = targets[s:s + chunk_size]
            logits = (h @ w.T).float()  # (c, V) fp32
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if want_h or want_w:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax in place of the logits
                probs[rows[:len(t)], t] -= 1.0
                g = probs.to(compute_dtype)  # dL/dlogits, (c, V)
                if want_h:
                    grad_h[s:s + chunk_size] = (g @ w).to(hidden.dtype)
                if want_w:
                    grad_w += (g.T @ h).float()
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.want = (want_h, want_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_out if ctx.want[0] else None
        grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if ctx.want[1] else None
        return grad_h, grad_w, None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of labelled tokens.

    hidden: (B, T, d) final hidden states; weight: (V, d) lm_head; labels: (B, T) with IGNORE where no loss.
    Position t predicts labels[t + 1]. Divide the sum by the token count of the whole (global) batch.
    """
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]  # (N, d): labelled positions only
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    dt = compute_dtype or (torch.get_autocast_dtype(hidden.device.type)
                           if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        loss = _ChunkedLinearCE.apply(h, weight, targets[keep], chunk_size, dt)
    return loss, n


def full_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The reference: full (B, T, V) logits, as `model(labels=...)` computes them. For tests and the benchmark."""
    logits = (hidden[:, :-1] @ weight.to(hidden.dtype).T).float()
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def causal_lm_loss(model, batch, chunked: bool = True, chunk_size: int | None = None) -> tuple[torch.Tensor, int]:
    """Run the decoder (no logits) and the summed loss. `chunked=False` uses the full-logits reference."""
    out = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = out.last_hidden_state  # (B, T, d)
    weight = model.get_output_embeddings().weight
    if not chunked:
        return full_lm_loss(hidden, weight, batch.labels)
    return chunked_lm_loss(hidden, weight, batch.labels, chunk_size)
