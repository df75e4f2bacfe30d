"""Tables and the loss-curve plot of tools/reproduce.py's results JSON (no computation: everything is read from it)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def _lr_key(lr: float) -> str:
    return f"{lr:g}"


class Summary:
    """The per-method view of the cells: sweep, chosen lr, per-seed test and deploy results."""

    def __init__(self, data: dict):
        self.plan, self.cells = data["plan"], data["cells"]
        self.methods = [m for m in self.plan["methods"] if f"prepare/{m}" in self.cells]

    def sweep(self, method: str) -> dict[float, dict]:
        seed = self.plan["seeds"][0]
        out = {}
        for key, c in self.cells.items():
            kind, m, lr, s = (key.split("/") + [None] * 4)[:4]
            if kind == "train" and m == method and s == str(seed):
                out[float(lr)] = c
        return dict(sorted(out.items()))

    def chosen(self, method: str) -> float | None:
        sweep = self.sweep(method)
        if len(sweep) < len(self.plan["lr_factors"]):
            return None
        return min(sweep, key=lambda lr: sweep[lr]["final_eval_loss"])

    def runs(self, method: str, kind: str, variant: str | None = None) -> list[dict]:
        lr = self.chosen(method)
        if lr is None:
            return []
        out = []
        for seed in self.plan["seeds"]:
            key = f"{kind}/{method}/{_lr_key(lr)}/{seed}" + (f"/{variant}" if variant else "")
            if key in self.cells:
                out.append({**self.cells[key], "seed": seed})
        return out


def _mean_spread(xs: list[float], fmt: str) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.mean(xs), fmt)} ({', '.join(format(x, fmt) for x in xs)})"


def _em(runs: list[dict]) -> str:
    """Mean exact match over seeds in %, with the binomial SE of one seed's figure; seeds listed."""
    if not runs:
        return "-"
    ps = [r["exact_match"] for r in runs]
    n = runs[0]["questions"]
    p = statistics.mean(ps)
    seeds = " / ".join(f"{100 * x:.1f}" for x in ps)
    return f"{100 * p:.1f} ± {100 * _se(p, n):.1f} ({seeds})"


def plan_line(data: dict) -> str:
    plan = data["plan"]
    return (f"{plan['steps']} steps x batch {plan['batch_size']} x seq {plan['seq_len']}, rank {plan['rank']}, "
            f"seeds {plan['seeds']}; exact match on {plan['test']} held-out questions (greedy, "
            f"{plan['max_new_tokens']} new tokens at most), in % ± binomial SE, per seed in brackets.")


def method_table(data: dict) -> str:
    s = Summary(data)
    plan = s.plan
    lines = ["| method | trainable params | lr swept: validation loss | chosen lr | validation loss, per seed "
             "| held-out loss, fp32 graph | EM fp32 graph | EM int4 | held-out loss int4 | train s / run "
             "| train peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in s.methods:
        sweep, lr = s.sweep(m), s.chosen(m)
        swept = ", ".join(f"{k:g}: {v['final_eval_loss']:.4f}" for k, v in sweep.items())
        train = [s.cells[f"train/{m}/{_lr_key(lr)}/{seed}"] for seed in plan["seeds"]
                 if lr is not None and f"train/{m}/{_lr_key(lr)}/{seed}" in s.cells]
        fp32, int4 = s.runs(m, "deploy", "fp32"), s.runs(m, "deploy", "int4")
        lines.append(
            f"| {m} | {s.cells[f'prepare/{m}']['trainable_params']:,} | {swept} | "
            f"{'-' if lr is None else f'{lr:g}'} | {_mean_spread([t['final_eval_loss'] for t in train], '.4f')} | "
            f"{_mean_spread([r['test_loss'] for r in fp32], '.4f')} | "
            f"{_em(fp32)} | {_em(int4)} | {_mean_spread([r['test_loss'] for r in int4], '.4f')} | "
            f"{_mean_spread([t['seconds'] for t in train], '.0f')} | "
            f"{_mean_spread([t['peak_rss_mb'] / 1024 for t in train], '.2f')} GiB |")
    return "\n".join(lines)


def parity_line(data: dict) -> str:
    """The PyTorch held-out loss of the one run that has it against its fp32 graph's."""
    s = Summary(data)
    for m in s.methods:
        for torch_run in s.runs(m, "test"):
            graph = [r for r in s.runs(m, "deploy", "fp32") if r["seed"] == torch_run["seed"]]
            if graph:
                return (f"The fp32 graph computes the trained function: {m} seed {torch_run['seed']}'s held-out "
                        f"loss is {torch_run['test_loss']:.5f} in PyTorch (`qosora.load`, fp32) and "
                        f"{graph[0]['test_loss']:.5f} through its fp32 graph.")
    return "No PyTorch parity cell yet."


def variants_table(data: dict) -> str:
    """Seed 0's held-out loss and exact match through each deploy variant's graph (export time, graph size)."""
    s = Summary(data)
    plan = s.plan
    variants = [v for v in plan["variants"] if v != "fp32"]
    lines = ["| method | " + " | ".join(["fp32"] + variants) + " |", "|---|" + "---|" * (1 + len(variants))]
    for m in s.methods:
        row = []
        for v in ["fp32"] + variants:
            r = [x for x in s.runs(m, "deploy", v) if x["seed"] == plan["seeds"][0]]
            row.append("-" if not r else f"{r[0]['test_loss']:.4f}, EM {100 * r[0]['exact_match']:.1f} % "
                                         f"({r[0]['export_s']:.0f} s, {r[0]['onnx_mb']:.0f} MB)")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def tables(data: dict) -> str:
    return "\n\n".join([plan_line(data), method_table(data), parity_line(data),
                         f"Deploy variants, seed {data['plan']['seeds'][0]}: held-out loss and exact match through "
                         "each graph (export time, graph size).", variants_table(data)])


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    s = Summary(data)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for i, m in enumerate(s.methods):
        color = f"C{i}"  # one colour per method; seeds after the first dotted
        lr = s.chosen(m)
        if lr is not None:
            for seed in s.plan["seeds"]:
                c = s.cells.get(f"train/{m}/{_lr_key(lr)}/{seed}")
                if c:
                    ax.plot(range(1, len(c["loss_curve"]) + 1), c["loss_curve"], lw=1, color=color,
                            label=f"{m} lr {lr:g} seed {seed}", ls="-" if seed == s.plan["seeds"][0] else ":")
        sweep = s.sweep(m)
        if sweep:
            bx.plot(list(sweep), [v["final_eval_loss"] for v in sweep.values()], "o-", color=color, label=m)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats / answer token)")
    ax.set_title("training loss at the chosen lr")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    bx.set_xscale("log")
    bx.set_yscale("log")  # a diverged lr would flatten the rest
    bx.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    bx.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    bx.set_xlabel("learning rate")
    bx.set_ylabel("validation loss after training")
    bx.set_title("learning-rate sweep (seed 0)")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def report(data: dict, plot_path: Path) -> str:
    text = tables(data)
    print(text)
    if plot(data, plot_path):
        print(f"wrote {plot_path}")
    return text
