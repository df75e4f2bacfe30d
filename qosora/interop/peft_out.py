"""`qosora convert`: hand a trained (or prepared) directory to PEFT, transformers and LoRA-serving stacks.

    --to peft   OUT/base/      the frozen NF4 residual, transformers' bitsandbytes 4-bit model (interop.bnb_base)
                OUT/adapter/   a PEFT LoRA, rank r, B A = the trained adapter (MethodSpec.lowrank: SORSA U diag(S), Vh;
                               OSoRA diag(O) U diag(S), Vh; PiSSA / QLoRA their B, A)
                PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT/base), OUT/adapter) computes
                deq(W_res) x + B (A x) + bias: DIR's function, the same NF4 bits
    --to lora   OUT/           a PEFT LoRA for the original model: B A - B0 A0 (qosora.interop.lora_delta), exact
                               against the unquantized weights, without the NF4 error the model was trained with

Both write OUT/README.md, saying what the output computes and how exactly; `convert` returns the report `--json` prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from qosora.files import atomic_directory
from qosora.interop.bnb_base import write_base
from qosora.interop.lora_delta import InitialPrincipal, exact_delta, pad, truncate
from qosora.interop.options import TARGETS, ConvertOptions, Target
from qosora.interop.peft_format import write_lora
from qosora.nf4 import DTYPES
from qosora.prepared import PreparedReader
from qosora.shards import ShardReader

LOAD = ('from transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n'
        'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}", dtype="auto"), "{adapter}")')


def convert(directory: str | Path, out: str | Path, to: Target = "peft", *, base: str | Path | None = None,
            dtype: str = "bfloat16", rank: int | None = None, overwrite: bool = False, progress: bool = False) -> dict:
    """Write `out` from the qosora directory `directory` (module docstring); returns the report.

    `base` (to="lora"): the original model directory; `rank` truncates the LoRA by SVD; `dtype` is that of the LoRA
    factors and of every tensor left unquantized (float32 rounds nothing).
    """
    options = ConvertOptions(to=to, base=None if base is None else str(base), dtype=dtype, rank=rank).validate()
    reader = PreparedReader(directory)
    reader.check()
    initial, inputs = None, [reader.directory]
    if options.base is not None:  # --to lora: B0 A0, and the original's shapes checked before anything is written
        initial = InitialPrincipal(reader, ShardReader(options.base))
        initial.check_shapes()
        inputs.append(initial.original.directory)
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite, inputs=inputs) as tmp:
        report = _WRITERS[options.to](reader, tmp, out.resolve(), options, initial, progress)
        report["bytes"] = {part: _size(tmp / part) for part in report.pop("parts")}
    return {"out_dir": str(out), "to": options.to, "method": reader.spec.name, "dtype": options.dtype,
            "modules": len(reader.modules), **report}


def _to_peft(reader: PreparedReader, tmp: Path, final: Path, options: ConvertOptions, initial, progress: bool) -> dict:
    write_base(reader, tmp / "base", options.dtype, progress=progress)
    lowrank = {m: reader.adapted(m).lowrank() for m in tqdm(reader.modules, desc="adapter", unit="linear",
                                                             disable=not progress)}
    rank = write_lora(tmp / "adapter", lowrank, DTYPES[options.dtype], num_layers=_layers(reader),
                      base_model=str(final / "base"),
                      metadata={"qosora": json.dumps({"source": str(reader.directory), "method": reader.spec.name,
                                                      "exact_against": "base/ (the NF4 residual)"})})
    (tmp / "README.md").write_text(
        f"# {reader.directory.name}: qosora {reader.spec.name}, rank {rank}, for transformers + PEFT\n\n"
        f"- `base/`: the frozen NF4 residual in transformers' bitsandbytes 4-bit format: the bits qosora trained on\n"
        f"- `adapter/`: a PEFT LoRA, r = lora_alpha = {rank}, B A = the trained adapter\n\n"
        f"```python\n{LOAD.format(base=final / 'base', adapter=final / 'adapter')}\n```\n\n"
        f"Exact: the pair computes the trained function deq(W_res) x + B (A x). With `--dtype float32` its logits "
        f"equal `qosora.load(\"{reader.directory}\", compute_dtype=\"float32\")`'s to float32 rounding; on CPUs "
        f"with AVX512-BF16, bitsandbytes runs 4-bit inference in bfloat16 unless each `Linear4bit` has "
        f"`support_avx512bf16_for_cpu = False`.\n")
    return {"rank": rank, "parts": ["base", "adapter"]}


def _to_lora(reader: PreparedReader, tmp: Path, final: Path, options: ConvertOptions, initial: InitialPrincipal,
             progress: bool) -> dict:
    deltas, dropped = {}, []
    for module in tqdm(reader.modules, desc="lora", unit="linear", disable=not progress):
        delta = exact_delta(reader.adapted(module).lowrank(), initial.lowrank(module))
        if options.rank is not None:
            delta, lost = truncate(delta, options.rank)
            dropped.append(lost)
        deltas[module] = delta
    rank = max(A.shape[0] for _, A in deltas.values())
    deltas = {m: pad(d, rank) for m, d in deltas.items()}
    summary = {
        "rank": rank, "exact": not any(d > 0 for d in dropped),
        "dropped_energy": {"mean": sum(dropped) / len(dropped), "max": max(dropped)} if dropped else None,
        "initial_principal": dict(initial.sources),
        "excludes": "the NF4 error of the residual the model was trained on" if reader.is_quantized() else None,
    }
    write_lora(tmp, deltas, DTYPES[options.dtype], num_layers=_layers(reader), base_model=str(_original(initial)),
               metadata={"qosora": json.dumps({"source": str(reader.directory), "method": reader.spec.name,
                                               "exact_against": "the unquantized original model", **summary})})
    (tmp / "README.md").write_text(_lora_readme(reader, summary, _original(initial), final))
    return {**summary, "parts": ["."]}


def _lora_readme(reader: PreparedReader, summary: dict, original: Path, final: Path) -> str:
    dropped = summary["dropped_energy"]
    truncation = ("exact (no truncation)" if summary["exact"] else
                  f"truncated to rank {summary['rank']} by SVD: {dropped['mean']:.2%} of the delta's energy dropped "
                  f"on average, {dropped['max']:.2%} at most")
    nf4_error = [s["rel_error"] for s in reader.stats().values() if isinstance(s, dict) and "rel_error" in s]
    error = (f" Exact against the unquantized weights only: it leaves out the NF4 error of the residual the model "
             f"was trained on (deq(NF4(W_res)) - W_res; mean relative weight error "
             f"{sum(nf4_error) / len(nf4_error):.4f}, stats.json), so on the original model it computes the trained "
             f"function without that error." if reader.is_quantized() and nf4_error else "")
    return (f"# {reader.directory.name}: qosora {reader.spec.name} as a LoRA for the original model\n\n"
            f"A PEFT LoRA, r = lora_alpha = {summary['rank']}, to apply to `{original}`: W + (B A - B0 A0), the "
            f"trained principal on the unquantized weights; {truncation}.{error}\n\n"
            f"```python\n{LOAD.format(base=original, adapter=final)}\n```\n")


_WRITERS: dict[str, Callable[..., dict]] = {"peft": _to_peft, "lora": _to_lora}
assert tuple(_WRITERS) == TARGETS


def _original(initial: InitialPrincipal) -> Path:
    return initial.original.directory.resolve()


def _layers(reader: PreparedReader) -> int:
    return int(reader.hf_config["num_hidden_layers"])


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "README.md")
