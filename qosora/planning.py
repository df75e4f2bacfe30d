"""`qosora plan`: the peak memory of a training step, by component, before renting a GPU.

Bytes, for what `qosora train` actually holds (L layers, N = batch * seq_len tokens, h hidden, i intermediate,
V vocabulary, P trainable factor parameters, F frozen factor parameters, W adapted weight elements):

| component        | bytes                                   | why |
|------------------|-----------------------------------------|-----|
| nf4_residual     | W/2 + W/64 + 4 W/16384                  | packed 4-bit codes, 8-bit absmax per 64, fp32 scale per 256 blocks |
| base_16bit       | 2 * (embeddings, lm_head, norms, biases)| bf16 (fp32 where the hardware has no bf16) |
| adapter_weights  | AdamW: 4 P + 2 F; 8-bit: 2 (P + F)      | AdamW: trainable factors in fp32 (its master weights); 8-bit AdamW (CUDA): bf16, updated in place |
| gradients        | AdamW: 4 P; 8-bit: 2 P                  | the factors' dtype |
| optimizer_states | 8 P (AdamW) or ~2.03 P (8-bit AdamW)    | two moments; blockwise 8-bit with an fp32 absmax per 256 |
| activations      | L * N * a(h, i, r)  or, checkpointed, L * N * 2h + N * a(h, i, r) | see `_layer_activation_bytes` |
| workspace        | 2 * max(W_m) + N * (8h + 6i)            | one dequantized NF4 weight and the backward's transient gradients |
| logits_loss      | chunked: 10 * c * V; full: 14 * N * V   | c = 2^25 / V rows; full = bf16 logits, fp32 copy, softmax, its gradient |
| runtime          | CUDA context, or the CPU process baseline (torch + transformers imported) | |

On CPU (`device="cpu"`, peak RSS) activations are scaled by CPU_ACTIVATION_OVERHEAD (measured, see below).

`a(h, i, r)` counts the tensors autograd saves per token in one Llama decoder layer under bf16 autocast
(2 RMSNorms with their fp32 upcasts, q/k/v/o inputs and the adapter's bf16 input copies, SDPA's q, k, v, out,
SwiGLU's gate, up, act, product). It was checked against a measured SmolLM2 peak: `tools/bench_train.py`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from qosora.architectures import config_sizes, read_json_object
from qosora.config import ALL_TARGETS, Method, PrepareConfig
from qosora.errors import QosoraError
from qosora.options import check, option, same_option
from qosora.train.config import Optim, TrainConfig

Device = Literal["cuda", "cpu"]

GiB = 1 << 30
KNOWN_MODELS = ("llama-2-7b", "llama-3-8b", "qwen2.5-7b")
CUDA_CONTEXT_BYTES = 500 * (1 << 20)       # CUDA context + cuBLAS workspace, outside torch's allocator
CPU_PROCESS_BYTES = 400 * (1 << 20)        # RSS of python + torch + transformers + bitsandbytes, measured here
CHUNK_ELEMENTS = 1 << 25                   # qosora.train.loss.CHUNK_ELEMENTS
# On CPU the decoder's forward grew RSS by 1.5x the bytes autograd saves (SmolLM2, seq 256 x 4: 1.20 GB vs
# 0.80 GB counted by saved_tensors_hooks): glibc keeps freed transients (dequantized NF4 weights, fp32 norm
# temporaries) in its arenas. CUDA's caching allocator reuses them; no factor there.
CPU_ACTIVATION_OVERHEAD = 1.5


@dataclass(frozen=True)
class ModelDims:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    head_dim: int | None = None

    @classmethod
    def from_config(cls, cfg: dict, where: str = "model config") -> "ModelDims":
        """From a Llama-shaped config.json; every size must be a positive integer."""
        if not isinstance(cfg, dict):
            raise QosoraError(f"{where} is not a JSON object: pass a Llama-shaped config.json")
        s = config_sizes(cfg, where)
        return cls(
            hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
            num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
            num_key_value_heads=s["num_key_value_heads"], vocab_size=s["vocab_size"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            head_dim=cfg.get("head_dim"),
        )

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of each linear of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.hd, self.num_key_value_heads * self.hd
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def read_model(config: str) -> ModelDims:
    """A known name (llama-2-7b, llama-3-8b, qwen2.5-7b), a config.json, or a model/prepared directory."""
    from qosora.data import MODELS_DIR

    path = MODELS_DIR / f"{config}.json" if config in KNOWN_MODELS else Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise QosoraError(f"--config {config}: no such file; pass a config.json, a model directory or one of "
                          f"{', '.join(KNOWN_MODELS)}")
    return ModelDims.from_config(read_json_object(path, "pass a Llama-shaped config.json"), str(path))


@dataclass(frozen=True)
class PlanOptions:
    """What `qosora plan` predicts: a model (`config`) and the training run's shape."""

    config: str = option(help="llama-2-7b | llama-3-8b | qwen2.5-7b | CONFIG.json | MODEL_DIR")
    method: Method = same_option(PrepareConfig, "method")
    rank: int = same_option(PrepareConfig, "rank")
    seq_len: int = same_option(TrainConfig, "seq_len", default=2048, min=1)
    batch_size: int = same_option(TrainConfig, "batch_size", default=1)
    optim: Optim = same_option(TrainConfig, "optim")
    gradient_checkpointing: bool = same_option(TrainConfig, "gradient_checkpointing")
    chunked_loss: bool = same_option(TrainConfig, "chunked_loss")
    targets: str | None = option(None, "comma list: q,k,v,o,gate,up,down (default: all)")
    device: Device = option("cuda", "cpu: peak RSS of a CPU run")
    bf16: bool = option(True, "16-bit non-adapted weights (fp32 where the hardware has no bf16)", cli=False)
    gpu_memory: float | None = option(None, "GiB available: say whether it fits", gt=0.0)

    def validate(self) -> "PlanOptions":
        check(self)
        if self.targets is not None:
            PrepareConfig.normalize_targets(self.targets)
        return self

    def target_names(self) -> tuple[str, ...]:
        return PrepareConfig.normalize_targets(self.targets) if self.targets else ALL_TARGETS


@dataclass
class PlanReport:
    model: str
    method: str
    rank: int
    seq_len: int
    batch_size: int
    optim: str
    gradient_checkpointing: bool
    chunked_loss: bool
    device: str
    trainable_params: int
    components: dict[str, int] = field(default_factory=dict)
    gpu_memory: int | None = None

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total_bytes <= self.gpu_memory

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        d["total_gib"] = round(self.total_bytes / GiB, 3)
        d["fits"] = self.fits
        return d


def _layer_activation_bytes(m: ModelDims, r: int, method: str, targets: tuple[str, ...], fp32_factors: bool) -> int:
    """Bytes autograd keeps per token in one decoder layer (bf16 autocast, SDPA attention).

    Counted from what each op saves for its backward, and checked with `saved_tensors_hooks` on a SmolLM2-shaped
    layer (SORSA r=16: 27.4 KB counted vs 27.9 KB measured; OSoRA 27.7 vs 27.8). bitsandbytes' 4-bit matmul
    saves no input (the residual is frozen); a frozen factor saves none either (OSoRA's Vh, U).
    """
    from qosora.methods import METHOD_SPECS

    h, i = m.hidden_size, m.intermediate_size
    q, kv, nh = m.num_attention_heads * m.hd, m.num_key_value_heads * m.hd, m.num_attention_heads
    shapes = m.linear_shapes()
    total = 2 * 4 * h                                # 2 RMSNorms: their fp32 upcast input
    total += 2 * q + 2 * kv + 2 * kv + 2 * q + 4 * nh  # SDPA: q, k, v, output, logsumexp
    total += 3 * 2 * i                               # SwiGLU: gate, silu(gate), up
    first_trainable = METHOD_SPECS[method].factors[0] in METHOD_SPECS[method].trainable
    if first_trainable and fp32_factors:
        # The adapter casts its input to the fp32 factors and autocast casts it back: one bf16 copy per linear.
        total += sum(2 * shapes[t][1] for t in targets)
    elif first_trainable:
        inputs = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
                  "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}  # shared inputs saved once
        total += sum(2 * shapes[t][1] for t in {inputs[t]: t for t in targets}.values())
    if method == "osora":
        total += sum(2 * shapes[t][0] for t in targets)  # O * (...) saves its d_out input
    total += 4 * r * len(targets)                    # rank-r intermediates
    return total


def plan(model: ModelDims | str, method: str = "sorsa", rank: int = 64, seq_len: int = 2048, batch_size: int = 1,
         optim: str = "adamw", gradient_checkpointing: bool = False, chunked_loss: bool = True,
         targets: tuple[str, ...] | str = ALL_TARGETS, device: str = "cuda", bf16: bool = True,
         gpu_memory: float | None = None) -> PlanReport:
    """Predict the peak memory of one training step (keyword form of `run_plan`). `gpu_memory` in GiB."""
    options = PlanOptions(
        config=model if isinstance(model, str) else "custom", method=method, rank=rank, seq_len=seq_len,
        batch_size=batch_size, optim=optim, gradient_checkpointing=gradient_checkpointing, chunked_loss=chunked_loss,
        targets=targets if isinstance(targets, str) else ",".join(targets), device=device, bf16=bf16,
        gpu_memory=gpu_memory,
    )
    return run_plan(options, model if isinstance(model, ModelDims) else None)


def run_plan(options: PlanOptions, dims: ModelDims | None = None) -> PlanReport:
    """The plan `options` describe, for `dims` or else the model `options.config` names. Options checked first."""
    from qosora.methods import METHOD_SPECS

    o = options.validate()
    m = dims if dims is not None else read_model(o.config)
    name, method, rank, seq_len, batch_size = o.config, o.method, o.rank, o.seq_len, o.batch_size
    optim, gradient_checkpointing, chunked_loss, device = o.optim, o.gradient_checkpointing, o.chunked_loss, o.device
    targets, bf16, gpu_memory = o.target_names(), o.bf16, o.gpu_memory
    spec = METHOD_SPECS[method]
    shapes = m.linear_shapes()
    for t in targets:
        if rank > min(shapes[t]):
            raise QosoraError(f"rank {rank} is too large for {t} of shape {shapes[t]} in {name}: "
                              f"use --rank <= {min(min(shapes[u]) for u in targets)}")
    L, N = m.num_hidden_layers, seq_len * batch_size
    h, i, V = m.hidden_size, m.intermediate_size, m.vocab_size
    half = 2 if bf16 else 4

    adapted = [shapes[t] for t in targets]
    W = L * sum(o * n for o, n in adapted)
    P = L * sum(spec.trainable_count(o, n, rank) for o, n in adapted)
    all_factors = {"U": lambda o, n: o * rank, "S": lambda o, n: rank, "Vh": lambda o, n: rank * n,
                   "O": lambda o, n: o, "A": lambda o, n: rank * n, "B": lambda o, n: o * rank}
    F = L * sum(all_factors[f](o, n) for o, n in adapted for f in spec.factors if f not in spec.trainable)

    embed = V * h * (1 if m.tie_word_embeddings else 2)
    norms = L * 2 * h + h
    unadapted = L * sum(o * n for t, (o, n) in shapes.items() if t not in targets)
    biases = L * (m.num_attention_heads * m.hd + 2 * m.num_key_value_heads * m.hd) if m.attention_bias else 0
    eight_bit = optim != "adamw" and device == "cuda"  # 8-bit AdamW falls back to AdamW off CUDA

    per_layer = _layer_activation_bytes(m, rank, method, targets, fp32_factors=not eight_bit)
    factor_bytes = 2 if eight_bit else 4
    if gradient_checkpointing:
        activations = L * N * 2 * h + N * per_layer  # each layer's input, plus one layer recomputed in backward
    else:
        activations = L * N * per_layer
    activations += N * 2 * h * 2                      # embedding output and final norm
    if device == "cpu":
        activations = int(activations * CPU_ACTIVATION_OVERHEAD)
    if chunked_loss:
        rows = min(N, max(16, CHUNK_ELEMENTS // V))
        logits = 10 * rows * V + N * h * 2 * 2        # bf16 chunk, fp32 copy, exp temporaries; labelled hidden states
    else:
        logits = 14 * N * V

    components = {
        "nf4_residual": W // 2 + W // 64 + 4 * (W // 16384),
        "base_16bit": half * (embed + norms + unadapted + biases),
        "adapter_weights": factor_bytes * P + half * F,
        "gradients": factor_bytes * P,
        "optimizer_states": int(P * (2 + 8 / 256)) if eight_bit else 8 * P,
        "activations": activations,
        "workspace": 2 * max(o * n for o, n in adapted) + N * (8 * h + 6 * i),
        "logits_loss": logits,
        "runtime": CUDA_CONTEXT_BYTES if device == "cuda" else CPU_PROCESS_BYTES,
    }
    return PlanReport(
        model=name, method=method, rank=rank, seq_len=seq_len, batch_size=batch_size,
        optim=optim if device == "cuda" else "adamw", gradient_checkpointing=gradient_checkpointing,
        chunked_loss=chunked_loss, device=device, trainable_params=P, components=components,
        gpu_memory=None if gpu_memory is None else int(gpu_memory * GiB),
    )
