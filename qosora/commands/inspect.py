"""qosora inspect DIR [--json] [--plot spectra.png]"""

from __future__ import annotations

from qosora.commands._common import add_verb, print_json


def add_parser(sub) -> None:
    p = add_verb(
        sub, "inspect", "Show per-layer rank, trainable counts, spectra and quantization error of a prepared directory.",
        "qosora inspect prepared/ --plot spectra.png", run,
    )
    p.add_argument("directory")
    p.add_argument("--json", action="store_true", help="print the full report (every module) as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write spectra and error-reduction plots")


def _fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def run(args) -> int:
    from qosora.inspection import check_plot_path, inspect, plot

    if args.plot:
        check_plot_path(args.plot)
    report = inspect(args.directory)
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print_json(report)
        return 0
    print(f"{report['directory']}: {report['method']} rank {report['rank']}, residual {report['quant']}, "
          f"{report['layers']} adapted linears, {report['trainable_params']:,} trainable, "
          f"trained steps {report['trained_steps']}")
    print(f"{'module type':<12}{'count':>6}{'rel err':>10}{'plain NF4':>11}{'reduction':>11}")
    for kind, s in sorted(report["by_type"].items()):
        red = None if s["error_reduction"] is None else 100 * s["error_reduction"]
        print(f"{kind:<12}{s['count']:>6}{_fmt(s['mean_rel_error']):>10}{_fmt(s['mean_rel_error_plain_nf4']):>11}"
              f"{_fmt(red, '.1f') + '%':>11}")
    print(f"\n{'module':<40}{'shape':>14}{'sigma_1':>10}{'sigma_r':>10}{'rel err':>10}{'plain':>10}")
    for row in report["modules"]:
        sv = row["singular_values"]
        shape = "x".join(map(str, row["shape"])) if row["shape"] else "-"
        print(f"{row['module']:<40}{shape:>14}{_fmt(sv[0] if sv else None, '.3f'):>10}"
              f"{_fmt(sv[-1] if sv else None, '.3f'):>10}{_fmt(row['rel_error']):>10}{_fmt(row['rel_error_plain_nf4']):>10}")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0
