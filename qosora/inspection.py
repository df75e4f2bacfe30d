"""`qosora inspect`: per-layer rank, trainable counts, singular value spectra and quantization error.

Everything comes from `qosora_config.json`, `stats.json` (measured at prepare time) and the adapter factors; no
model is built. The optional plot shows, per module type, the mean top-r spectrum and the error reduction of
`deq(NF4(W_res)) + principal` over plain `deq(NF4(W))`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from qosora.architectures import parse_linear
from qosora.errors import QosoraError
from qosora.prepared import PreparedReader


def inspect(directory: str | Path) -> dict:
    reader = PreparedReader(directory)
    cfg = reader.config
    stats = reader.stats()
    rows = []
    for module in reader.modules:
        s = stats.get(module, {})
        row = {
            "module": module,
            "shape": s.get("shape"),
            "rank": cfg.prepare.rank,
            "trainable": s.get("trainable"),
            "rel_error": s.get("rel_error"),
            "rel_error_plain_nf4": s.get("rel_error_plain_nf4"),
            "singular_values": s.get("singular_values", []),
        }
        if "S" in reader.spec.factors:  # current (possibly trained) singular values
            row["current_singular_values"] = reader.factors(module)["S"].float().tolist()
        rows.append(row)
    by_type: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_type[parse_linear(row["module"])[1]].append(row)
    summary = {}
    for kind, rs in by_type.items():
        err = [r["rel_error"] for r in rs if r["rel_error"] is not None]
        plain = [r["rel_error_plain_nf4"] for r in rs if r["rel_error_plain_nf4"] is not None]
        summary[kind] = {
            "count": len(rs),
            "mean_rel_error": sum(err) / len(err) if err else None,
            "mean_rel_error_plain_nf4": sum(plain) / len(plain) if plain else None,
            "error_reduction": 1 - sum(err) / sum(plain) if plain and err else None,
        }
    return {
        "directory": str(reader.directory),
        "method": cfg.prepare.method,
        "rank": cfg.prepare.rank,
        "quant": cfg.prepare.quant.quant_type,
        "refine_rounds": cfg.prepare.svd.refine_rounds,
        "trained_steps": cfg.trained_steps,
        "layers": len(rows),
        "trainable_params": sum(r["trainable"] or 0 for r in rows),
        "by_type": summary,
        "modules": rows,
    }


def check_plot_path(path: str | Path) -> None:
    """Fail before any work if the plot cannot be written: matplotlib missing, or no directory to write into."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise QosoraError("--plot needs matplotlib, which is not installed: pip install 'qosora[plot]' "
                          "(or drop --plot)") from None
    path = Path(path)
    if path.is_dir():
        raise QosoraError(f"--plot {path} is a directory: pass a file name such as spectra.png")
    if not path.parent.is_dir():
        raise QosoraError(f"--plot {path}: directory {path.parent} does not exist: create it or choose another path")


def plot(report: dict, path: str | Path) -> Path:
    """Spectra (mean top-r singular values, normalised by the largest) and error reduction per module type."""
    check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_kind: dict[str, list[list[float]]] = defaultdict(list)
    for row in report["modules"]:
        if row["singular_values"]:
            sv = row["singular_values"]
            by_kind[parse_linear(row["module"])[1]].append([v / sv[0] for v in sv])
    for kind, spectra in sorted(by_kind.items()):
        n = min(len(s) for s in spectra)
        mean = [sum(s[i] for s in spectra) / len(spectra) for i in range(n)]
        ax1.plot(range(1, n + 1), mean, label=kind)
    ax1.set(title="top-r singular values (mean over layers, / sigma_1)", xlabel="index", ylabel="sigma_i / sigma_1")
    ax1.legend(fontsize=8)
    kinds = sorted(k for k, v in report["by_type"].items() if v["error_reduction"] is not None)
    ax2.bar(kinds, [100 * report["by_type"][k]["error_reduction"] for k in kinds])
    ax2.set(title="error reduction vs plain NF4 (%)", ylabel="%")
    ax2.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{report['method']} rank {report['rank']}, refine rounds {report['refine_rounds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
