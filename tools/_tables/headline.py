"""README.md's headline table: one row per claim, each read from the same JSON as BENCHMARKS.md's tables."""

from __future__ import annotations

from .core import bold, md_table, pct, signed, table, times
from .export import _export_run, _increase, _optimum_routes
from .pipeline import _decode_cell


@table("headline", "prepare", "fidelity", "train", "export", "decode", "rehearsal_7b", "export_calibrated",
       "export_calibrated_bs64", "export_calibrated_rotated", "export_calibrated_rotated_bs64", "reproduce")
def _headline(j):
    """One entry a row, (what, measured, anchor): a new headline is one more entry. None (no data) is left out."""
    prep, fid, train, dec, big = j["prepare"], j["fidelity"]["results"], j["train"], j["decode"], j["rehearsal_7b"]
    ex = _export_run(j, "export")  # speed, export cost, greedy agreement
    ex32, ex64 = j["export_calibrated"], j["export_calibrated_bs64"]  # perplexities: today's rows
    rot32, rot64 = j["export_calibrated_rotated"], j["export_calibrated_rotated_bs64"]
    big_ratio = {step: big["steps"][step]["peak_rss_bytes"] / big["checkpoint_bf16_bytes"]
                 for step in ("prepare", "train", "export")}
    rows = [
        ("`qosora prepare` rank 64, time / peak RSS",
         f"{times(prep['time_ratio_qosora_over_peft'])} / {times(prep['rss_ratio_qosora_over_peft'])}",
         "PEFT's PiSSA route (fp32 load, `pissa_niter_4`, 4-bit reload)"),
        ("error below plain NF4, 1 / 5 rounds",
         f"{pct(fid['randomized SVD, 1 round']['error_reduction'])} / "
         f"{pct(fid['randomized SVD, 5 rounds']['error_reduction'])}",
         "bitsandbytes NF4 of the same weights (QLoRA's base)"),
        ("training step, SORSA / OSoRA, s/step",
         f"{times(train['sorsa']['time_ratio_vs_peft'])} / {times(train['osora']['time_ratio_vs_peft'])}",
         "PEFT QLoRA r16"),
        _headline_export_cost(ex),
        ("int4 linears, perplexity increase, our lowest calibrated: fixture 32 / 64, rotated 32 / 64",
         " / ".join(signed(_lowest_calibrated(run)) for run in (ex32, ex64, rot32, rot64)),
         "onnxruntime's best (HQQ) " + " / ".join(signed(_increase(run, "ort-hqq"))
                                                  for run in (ex32, ex64, rot32, rot64))),
        ("int4 linears, data-free `--keep-principal`, fixture block 32 / 64",
         f"{signed(_increase(ex32, 'int4-keep-principal'))} / {bold(signed(_increase(ex64, 'int4-keep-principal')))}",
         f"on the rotated copy (no Q4_1 grid): {signed(_increase(rot32, 'int4-keep-principal'))} / "
         f"{signed(_increase(rot64, 'int4-keep-principal'))} vs onnxruntime HQQ {signed(_increase(rot32, 'ort-hqq'))}"
         f" / {signed(_increase(rot64, 'ort-hqq'))}"),
        ("`export --calibrate` (GPTQ), default int4 graph, fixture / rotated copy",
         f"{signed(_increase(ex32, 'int4-gptq'))} / {signed(_increase(rot32, 'int4-gptq'))} "
         f"(data-free {signed(_increase(ex32, 'int4'))} / {signed(_increase(rot32, 'int4'))})",
         f"onnxruntime GPTQ, lm_head dense {signed(_increase(ex32, 'ort-gptq'))} (fixture)"),
        ("`export --format trt-int4 --calibrate` (`sym-search`, standard ONNX ops), fixture / rotated",
         f"{signed(_increase(ex32, 'trt-int4-sym-search-gptq'))} / "
         f"{signed(_increase(rot32, 'trt-int4-sym-search-gptq'))}",
         f"onnxruntime RTN asymmetric, lm_head dense {signed(_increase(ex32, 'ort-rtn-asym'))} / "
         f"{signed(_increase(rot32, 'ort-rtn-asym'))}"),
        ("`qosora generate` int4 decode, 1 / 2 threads, batch 1",
         f"{_decode_range(dec, threads=1, batch_size=1)} / {_decode_range(dec, threads=2, batch_size=1)}",
         "onnxruntime-genai's Generator on its builder's int4 graph, AVX-512 CPU"),
        ("prefill of 512 tokens / int4 perplexity increase",
         f"{times(_decode_cell(dec, 1, 512, 1)['prefill_vs_anchor']['qosora on ours'])} the time / "
         f"{dec['perplexity']['increase']['ours']:+.2f}",
         f"same anchor / {dec['perplexity']['increase']['builder']:+.2f}"),
        ("Llama-2-7B shape on this CPU: prepare, train, export peak RSS",
         " / ".join(times(x) for x in big_ratio.values()) + " the bf16 checkpoint",
         f"training peak {times(big['training_peak']['measured_over_planned'])} `qosora plan`"),
        ("nf4 export greedy agreement, 64 tokens x 5 prompts",
         f"{ex['greedy_64']['nf4']['greedy_agree_tokens']} / {ex['greedy_64']['nf4']['greedy_total_tokens']}",
         "PyTorch model of the same directory"),
        _headline_methods(j["reproduce"]),
    ]
    return md_table(("what", "measured", "anchor, same run"), [r for r in rows if r is not None])


def _headline_methods(data: dict) -> tuple | None:
    """The reproduction study, seed 0: validation loss at each method's tuned lr against its default lr's."""
    from _reproduce_report import Summary

    s = Summary(data)
    seed, names, tuned, untuned = s.plan["seeds"][0], [], [], []
    for m in s.methods:
        lr = s.chosen(m)
        # The results file keeps the cells in run order: a method's first cells are its sweep at default x factors.
        first = [c for k, c in s.cells.items() if k.startswith(f"train/{m}/") and k.endswith(f"/{seed}")]
        if lr is None or len(first) < len(s.plan["lr_factors"]):
            continue
        names.append(_METHOD_NAMES.get(m, m))
        tuned.append(f"{s.cells[f'train/{m}/{lr:g}/{seed}']['final_eval_loss']:.3f}")
        untuned.append(f"{first[s.plan['lr_factors'].index(1.0)]['final_eval_loss']:.3f}")
    if not names:
        return None
    return (f"GSM8K validation loss at each method's tuned lr, {' / '.join(names)} (135M, {s.plan['steps']} steps, "
            f"seed {seed})", " / ".join(tuned), f"at each method's default lr: {' / '.join(untuned)}")


_METHOD_NAMES = {"qlora": "QLoRA", "pissa": "PiSSA", "sorsa": "SORSA", "osora": "OSoRA"}


def _lowest_calibrated(run: dict) -> float:
    """The lowest perplexity increase of our calibrated linears-only rows."""
    return min(v for k, v in run["perplexity"]["increase"].items()
               if k.startswith("int4-linears-") and k.endswith("-gptq"))


def _headline_export_cost(run: dict) -> tuple | None:
    """Time and peak RSS of our int4 export against optimum's route, where the run measured it."""
    if "optimum_anchor" not in run:
        return None
    rtn_s, rtn_mib = _optimum_routes(run["optimum_anchor"])["rtn-asym"]
    ours = run["exports"]["int4"]
    return ("`qosora export` int4, time / peak RSS", f"{times(ours['wall_s'] / rtn_s)} / "
            f"{times(ours['peak_rss_mb'] / rtn_mib)}", "optimum-onnx export + onnxruntime int4 quantizer")


def _decode_range(decode: dict, threads: int, batch_size: int) -> str:
    """Our decode speed over the anchor's, lowest-highest over prompt lengths: '0.95-1.01x'."""
    ratios = [s["decode_vs_anchor"]["qosora on ours"] for s in decode["summary"]
              if (s["threads"], s["batch_size"]) == (threads, batch_size)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}x"
