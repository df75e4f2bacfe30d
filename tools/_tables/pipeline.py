"""The tables of BENCHMARKS.md's pipeline sections: demo, prepare, streaming, the 7B rehearsal, training, decode."""

from __future__ import annotations

import re

from .core import bold, gib, md_table, mib, pct, seconds, table, times, verdict



@table("demo", "demo")
def _demo(j):
    runs = j["demo"]["runs"]
    rows = []
    for name, run in runs.items():
        quiet = runs[name.replace("one core busy", "quiet")]  # each loaded run against its quiet twin
        ratio = f"{run['wall_s'] / quiet['wall_s']:.2f}"
        rows.append((name, f"{run['wall_s']:.1f}", f"{run['prepare_and_train_s']:.1f}", _train_compute(run["compute"]),
                     ratio if run is quiet else bold(ratio)))
    return md_table(("run", "wall s", "prepare + train s", "train computes in", "/ quiet"), rows)


def _train_compute(log_line: str) -> str:
    """'qosora train: computing in bf16 (autocast) on cpu (...); 2 threads' -> 'bf16, 2 threads'."""
    dtype, threads = re.search(r"computing in (\w+).*; (\d+) threads", log_line).groups()
    return f"{dtype}, {threads} thread" + ("" if threads == "1" else "s")


_FIDELITY_ROWS = (  # (fidelity.json result, label, highlighted)
    ("plain NF4 (qlora init)", "plain NF4, bitsandbytes (the anchor; `qlora --nf4-scale absmax`)", False),
    ("plain NF4, searched scales", "plain NF4, searched scales (`qlora`)", False),
    ("randomized SVD, 1 round, absmax scales", "randomized SVD, 1 round, bitsandbytes' absmax scales", False),
    ("randomized SVD, 1 round", "randomized SVD, 1 round (the default)", True),
    ("exact SVD, 1 round", "exact SVD, 1 round", False),
    ("randomized SVD, 5 rounds, absmax scales", "randomized SVD, 5 QPiSSA rounds, absmax scales", False),
    ("randomized SVD, 5 rounds", "randomized SVD, 5 QPiSSA rounds (`--refine-rounds 5`)", True),
)


@table("fidelity", "fidelity")
def _fidelity(j):
    results = j["fidelity"]["results"]
    rows = []
    for key, label, highlighted in _FIDELITY_ROWS:
        r = results[key]
        reduction = pct(r["error_reduction"])
        rows.append((bold(label) if highlighted else label, f"{r['mean_rel_error']:.4f}",
                     bold(reduction) if highlighted else reduction, f"{r['kl_from_fp32']:.4f}",
                     f"{r['kl_ratio_vs_plain_nf4']:.2f}"))
    return md_table(("residual", "mean rel. error", "reduction vs plain NF4", "KL from fp32", "KL / plain NF4's"), rows)


@table("prepare", "prepare")
def _prepare(j):
    p = j["prepare"]
    ours, peft = p["summary"]["qosora"], p["summary"]["peft"]
    rows = [
        (f"wall time (median of {p['repeats']}: {ours['seconds_median']:.1f} s vs {peft['seconds_median']:.1f} s)",
         bold(f"{p['time_ratio_qosora_over_peft']:.2f}")),
        (f"peak RSS, whole route ({mib(ours['peak_rss_bytes_median'])} vs {mib(peft['peak_rss_bytes_median'])})",
         bold(f"{p['rss_ratio_qosora_over_peft']:.2f}")),
        (f"output on disk ({mib(ours['output_bytes'])} vs {mib(peft['output_bytes'])})",
         f"{ours['output_bytes'] / peft['output_bytes']:.2f}"),
    ]
    return md_table(("", "qosora / PEFT"), rows)


_STREAMING_ROWS = (  # (streaming.json step, label)
    ("prepare", "`qosora prepare --rank 64` (searched NF4 scales)"),
    ("merge", "`qosora merge --dtype bfloat16`"),
    ("export_int4", "`qosora export --format int4 --no-check` (default CPU form, `asym`)"),
)


@table("streaming", "streaming")
def _streaming(j):
    s = j["streaming"]
    rows = [(label, f"{s[k]['seconds']:.0f}", mib(s[k]["peak_rss_bytes"]), bold(f"{s[k]['rss_over_fp32']:.2f}"))
            for k, label in _STREAMING_ROWS]
    return md_table(("command", "wall s", "peak RSS", "RSS / fp32 size"), rows)


@table("rehearsal_7b", "rehearsal_7b")
def _rehearsal_7b(j):
    r = j["rehearsal_7b"]
    steps, checks, settings = r["steps"], r["checks"], r["settings"]

    def row(step: str, label: str, target: str = "") -> tuple:
        peak = steps[step]["peak_rss_bytes"]
        return label, seconds(steps[step]["seconds"]), gib(peak), f"{peak / r['checkpoint_bf16_bytes']:.2f}", target

    prepare_check = checks["prepare_peak_le_0.35x_checkpoint_plus_2gib"]
    export_check = checks["export_peak_le_0.5x_checkpoint"]
    train_check = checks["train_peak_within_15pct_of_plan"]
    train_vs_plan = f"within 15 % of the plan: {bold(times(r['training_peak']['measured_over_planned']))}"
    generate = steps["generate"]["result"]
    rows = [
        row("prepare", f"`prepare --rank {settings['rank']}`",
            f"<= 0.35x + 2 GiB ({prepare_check['limit_gib']:.2f} GiB): {verdict(prepare_check['ok'])}"),
        ("`plan --device cpu` (the train step's settings)", seconds(steps["plan"]["seconds"]), "", "",
         f"planned {gib(steps['plan']['result']['total_bytes'])}"),
        row("train", f"`train` {settings['steps']} steps, seq {settings['seq_len']}, batch 1, gradient checkpointing, "
                     "chunked CE, packed", train_vs_plan if train_check["ok"] else f"{train_vs_plan}, **not met**"),
        row("merge", "`merge --dtype bfloat16`"),
        row("export", "`export --format int4` (CPU form, `asym`, no parity check)",
            f"<= 0.5x ({export_check['limit_gib']:.2f} GiB): {verdict(export_check['ok'])}"),
        row("export_cuda", "`export --format int4 --device cuda` (`hqq`, float16)"),
        row("generate", f"`generate`, {generate['new_tokens']} tokens from the int4 export",
            f"({generate['decode_tokens_per_s']:.1f} tok/s decode)"),
    ]
    return md_table(("step", "wall", "peak RSS", "peak RSS / bf16 checkpoint", "target"), rows)


_TRAIN_ROWS = (  # (train.json config, label, highlighted)
    ("sorsa", "qosora SORSA (with its orthonormal regularizer)", True),
    ("osora", "qosora OSoRA", True),
    ("sorsa_full_logits", "qosora SORSA, full-logits loss", False),  # memory only: the chunked loss's saving
)


@table("train", "train")
def _train(j):
    rows = []
    for key, label, highlighted in _TRAIN_ROWS:
        r = j["train"][key]
        time_ratio = "-" if r["time_ratio_vs_peft"] is None else f"{r['time_ratio_vs_peft']:.2f}"
        rss_ratio = f"{r['rss_ratio_vs_peft']:.2f}"
        rows.append((label, *((bold(time_ratio), bold(rss_ratio)) if highlighted else (time_ratio, rss_ratio))))
    return md_table(("config", "s/step / PEFT QLoRA", "peak RSS / PEFT QLoRA"), rows)


@table("planner", "train", "rehearsal_7b")
def _planner(j):
    smol = j["train"]["plan_sorsa"]
    big = j["rehearsal_7b"]["training_peak"]
    rows = [
        ("SmolLM2 SORSA step on this CPU (`--device cpu`)", mib(smol["predicted_bytes"]),
         mib(smol["measured_bytes"]), f"{smol['predicted_bytes'] / smol['measured_bytes']:.2f}"),
        ("Llama-2-7B shape, SORSA r128, seq 512, CPU (the rehearsal above)", gib(big["planned_bytes"]),
         gib(big["measured_bytes"]), f"{big['planned_bytes'] / big['measured_bytes']:.2f}"),
    ]
    return md_table(("prediction", "planned", "measured", "planned / measured"), rows)


_FINETUNE_METHODS = {"sorsa": "SORSA", "osora": "OSoRA", "pissa": "PiSSA"}


@table("finetune", "finetune")
def _finetune(j):
    rows = [(_FINETUNE_METHODS[r["method"]], _short_exp(r["lr"]), f"{r['initial_eval_loss']:.3f}",
             f"{r['final_eval_loss']:.3f}", f"{100 * (r['final_eval_loss'] / r['initial_eval_loss'] - 1):+.0f} %")
            for r in j["finetune"]["runs"]]
    return md_table(("method", "lr", "held-out loss before", "after", "change"), rows)


def _short_exp(x: float) -> str:
    """0.0001 -> '1e-4' (Python writes '1e-04')."""
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{x:.0e}")


def _decode_cell(decode: dict, threads: int, prompt_len: int, batch_size: int) -> dict:
    return next(s for s in decode["summary"]
                if (s["threads"], s["prompt_len"], s["batch_size"]) == (threads, prompt_len, batch_size))


@table("decode", "decode")
def _decode(j):
    rows = []
    for s in j["decode"]["summary"]:
        ours, anchor = s["medians"]["qosora on ours"], s["medians"]["genai on builder"]
        prefill = f"{s['prefill_vs_anchor']['qosora on ours']:.2f}"
        if s["batch_size"] == 1:
            prefill = bold(prefill) if s["prompt_len"] == 512 else prefill  # the README's headline cell
            prefill += f" ({ours['prefill_ms']:.0f} / {anchor['prefill_ms']:.0f} ms)"
        rows.append((s["threads"], s["prompt_len"], s["batch_size"], f"{s['decode_vs_anchor']['qosora on ours']:.2f}x",
                     f"{anchor['decode_tps']:.1f}", f"{s['decode_vs_anchor']['genai on ours']:.2f}x", prefill))
    return md_table(("threads", "prompt", "batch", "`qosora generate` on our graph", "anchor tok/s",
                     "onnxruntime-genai on our graph", "prefill, ours / anchor"), rows)
