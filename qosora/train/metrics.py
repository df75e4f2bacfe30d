"""Training metrics: metrics.jsonl (one JSON object a line, resumable) and the loss plot."""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


class MetricsLog:
    """metrics.jsonl, one JSON object a line; on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.is_file():
            keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            path.write_text("".join(l + "\n" for l in keep))

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()] if self.path.is_file() else []


def plot_loss(metrics: list[dict], path: Path) -> bool:
    """Loss curve (train per step, eval as markers) as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
