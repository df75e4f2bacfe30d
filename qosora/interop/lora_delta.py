"""The trained adapter as a LoRA against the original weights: delta = B A - B0 A0.

    prepare:    W_res = W - B0 A0               B0 A0: the principal at initialisation (MethodSpec.lowrank)
    trained:    deq(NF4(W_res)) + B A
    original:   W + (B A - B0 A0) = W_res + B A  the trained principal on the unquantized residual; it leaves out
                                                 the NF4 error deq(NF4(W_res)) - W_res the model was trained on

B0 A0 comes from the prepared directory the run started from (DIR/prepared, when its residual is DIR's), else it is
recomputed from the original weights by prepare's own seeded decomposition (`qosora.preparation.initial_factors`).
Either way W - B0 A0 must quantize to DIR's stored residual bit for bit (`InitialPrincipal.lowrank`): that proves
B0 A0 and that --base is the model DIR was prepared from, before anything is written.

The delta as one low-rank product, exact (`exact_delta`), float64:

    [B, -B0] [A; A0]    rank 2r   SORSA, PiSSA
    (B - B0) A          rank r    when A = A0 (OSoRA: Vh stays frozen)
    B A                 rank r    when B0 = 0 (QLoRA)

`truncate` keeps its top-k singular triplets from a QR of each factor (never the d_out x d_in matrix) and reports the
energy ||delta - delta_k||_F^2 / ||delta||_F^2 it drops.
"""

from __future__ import annotations

from contextlib import contextmanager
import torch

from qosora.errors import QosoraError
from qosora.nf4 import NF4Weight
from qosora.prepared import PreparedReader, is_prepared
from qosora.preparation import initial_factors, module_seeds, store_residual
from qosora.shards import ShardReader
from qosora.train.rundir import PREPARED

LowRank = tuple[torch.Tensor, torch.Tensor]  # (B (d_out, k), A (k, d_in))


def exact_delta(trained: LowRank, initial: LowRank) -> LowRank:
    """B A - B0 A0 as (B_d (d_out, k), A_d (k, d_in)) in float64, k = 2r, or r when A = A0 or B0 = 0."""
    (B, A), (B0, A0) = [(b.double(), a.double()) for b, a in (trained, initial)]
    if torch.equal(A, A0):
        return B - B0, A
    if not B0.any():
        return B, A
    return torch.cat([B, -B0], dim=1), torch.cat([A, A0], dim=0)


def truncate(delta: LowRank, rank: int) -> tuple[LowRank, float]:
    """The best rank-`rank` approximation of B_d A_d (Eckart-Young), split sqrt(S) to each side, and the fraction of
    its energy dropped. With Q_b R_b = B_d, Q_a R_a = A_d^T and U S Vh = R_b R_a^T: B_d A_d = (Q_b U) S (Q_a Vh^T)^T."""
    B, A = delta
    if rank >= A.shape[0]:
        return delta, 0.0
    Qb, Rb = torch.linalg.qr(B)      # (d_out, k), (k, k)
    Qa, Ra = torch.linalg.qr(A.mT)   # (d_in, k), (k, k)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.mT)
    energy = float((S**2).sum())
    dropped = float((S[rank:] ** 2).sum()) / energy if energy > 0 else 0.0
    root = S[:rank].sqrt()
    return ((Qb @ U[:, :rank]) * root, root[:, None] * (Vh[:rank] @ Qa.mT)), dropped


def pad(delta: LowRank, rank: int) -> LowRank:
    """Zero columns of B and rows of A up to `rank` (one PEFT rank for every module)."""
    B, A = delta
    extra = rank - A.shape[0]
    return torch.nn.functional.pad(B, (0, extra)), torch.nn.functional.pad(A, (0, 0, 0, extra))


@contextmanager
def _one_thread():
    # prepare decomposes on CPU with one intra-op thread per module (qosora.preparation._in_order); a matmul's
    # float32 rounding can depend on the thread count, and the check below is bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _same_residual(a: NF4Weight | torch.Tensor, b: NF4Weight | torch.Tensor) -> bool:
    if isinstance(a, NF4Weight) != isinstance(b, NF4Weight):
        return False
    if not isinstance(a, NF4Weight):
        return torch.equal(a.float(), b.float())
    ta, tb = a.to_tensors("r"), b.to_tensors("r")
    return ta.keys() == tb.keys() and all(torch.equal(ta[k].cpu(), tb[k].cpu()) for k in ta)


class InitialPrincipal:
    """B0 A0 of each module of a trained directory, checked against the original weights in `original`."""

    def __init__(self, reader: PreparedReader, original: ShardReader):
        self.reader, self.original = reader, original
        self.config = reader.config.prepare
        self.seeds = module_seeds(self.config.svd.seed, reader.modules)
        candidate = reader.directory / PREPARED
        self.prepared = PreparedReader(candidate) if is_prepared(candidate) else None
        self.sources = {"prepared": 0, "recomputed": 0}  # where each module's B0 A0 came from

    def check_shapes(self) -> None:
        """The original model must have every adapted weight with DIR's shape (before any output is written)."""
        for module in self.reader.modules:
            name, shape = f"{module}.weight", self.reader.module_shape(module)
            found = tuple(self.original.shape(name)) if name in self.original else None
            if found != shape:
                raise QosoraError(f"--base {self.original.directory}: {name} is {found or 'missing'}, but "
                                  f"{self.reader.directory} has {shape}: pass the model it was prepared from "
                                  f"({self.reader.config.source.get('path', '?')})")

    def lowrank(self, module: str) -> LowRank:
        """(B0 fp32 (d_out, r), A0 fp32 (r, d_in)), after W - B0 A0 reproduced the stored residual bit for bit."""
        stored = self.reader.residual(module)
        W = self.original.get(f"{module}.weight")
        with _one_thread():
            if (self.prepared is not None and module in self.prepared.modules
                    and _same_residual(self.prepared.residual(module), stored)):
                factors, source = self.prepared.factors(module), "prepared"
            else:
                factors, source = initial_factors(W, self.config, self.seeds[module])[0], "recomputed"
            B0, A0 = self.reader.spec.lowrank(factors)
            reproduced = _same_residual(store_residual(W, B0 @ A0, self.config.quant), stored)
        if not reproduced:
            origin = f"from {self.prepared.directory}" if source == "prepared" else "recomputed"
            raise QosoraError(
                f"--base {self.original.directory}: module {module}: W - B0 A0 ({origin}) does not quantize to the "
                f"residual stored in {self.reader.directory}, bit for bit: pass the model it was prepared from "
                f"({self.reader.config.source.get('path', '?')}), on the kind of device it was prepared on")
        self.sources[source] += 1
        return B0, A0
