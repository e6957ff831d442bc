"""`minicaffe plot-log CHART OUT.png LOG...`: training curves, as Caffe's plot_training_log.py.

    minicaffe plot-log --list                    # the chart types
    minicaffe plot-log 6 loss.png lenet.log      # Train loss vs. Iters
    minicaffe plot-log 0 acc.svg a.log b.log     # Test accuracy vs. Iters, one curve per log

The chart types are numbered as Caffe's script numbers them. "loss" and "accuracy" are the
net outputs of those names (else the first output whose name contains the word); --field
picks another output. Needs matplotlib (`pip install 'minicaffe[plot]'`).
"""
import os

X_FIELDS = {"Iters": "NumIters", "Seconds": "Seconds"}
# Caffe's list: every (y, x) pair of its sorted field names, y first.
Y_FIELDS = [("Test", "accuracy"), ("Test", "loss"), ("Train", "learning rate"), ("Train", "loss")]
CHART_TYPES = [(kind, what, x) for kind, what in Y_FIELDS for x in ("Iters", "Seconds")]


def describe(chart):
    kind, what, x = CHART_TYPES[chart]
    return f"{kind} {what}  vs. {x}"


def register(subparsers):
    p = subparsers.add_parser(
        "plot-log", help="plot loss/accuracy/learning-rate curves of training logs",
        description="Draw one chart of Caffe's plot_training_log.py for one or more training logs "
                    "(PNG, SVG, PDF: the output's extension). Chart types: "
                    + "; ".join(f"{i}: {describe(i)}" for i in range(len(CHART_TYPES))))
    p.add_argument("chart_type", metavar="CHART", nargs="?", type=int)
    p.add_argument("output", metavar="OUT.png", nargs="?")
    p.add_argument("logs", metavar="LOG", nargs="*")
    p.add_argument("--list", action="store_true", help="print the chart types and exit")
    p.add_argument("--field", help="the net output to plot instead of the chart's loss/accuracy")
    p.set_defaults(func=run)


def _column(columns, what, field, log):
    if what == "learning rate":
        return "LearningRate"
    if field:
        if field not in columns:
            raise KeyError(f"{log}: no net output {field!r} (outputs: {_outputs(columns)})")
        return field
    if what in columns:
        return what
    matches = [c for c in _outputs(columns) if what in c]
    if not matches:
        raise KeyError(f"{log}: no net output named like {what!r} (outputs: {_outputs(columns)}); "
                       f"pick one with --field")
    return matches[0]


def _outputs(columns):
    return [c for c in columns if c not in ("NumIters", "Seconds", "LearningRate")]


def run(args):
    if args.list:
        for i in range(len(CHART_TYPES)):
            print(f"    {i}: {describe(i)}")
        return 0
    if args.chart_type is None or args.output is None or not args.logs:
        raise ValueError("usage: minicaffe plot-log CHART OUT.png LOG [LOG ...] "
                         "(minicaffe plot-log --list for the chart types)")
    if not 0 <= args.chart_type < len(CHART_TYPES):
        raise ValueError(f"{args.chart_type} is not a valid chart type (0-{len(CHART_TYPES) - 1}; "
                         f"see minicaffe plot-log --list)")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot-log needs matplotlib: pip install 'minicaffe[plot]'") from None
    from ..proto_io import atomic_write
    from ..training_log import parse_log
    import io

    kind, what, x = CHART_TYPES[args.chart_type]
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        for log in args.logs:
            train, test = parse_log(log)
            rows = train if kind == "Train" else test
            if not rows:
                raise ValueError(f"{log}: no {kind.lower()} net output lines to plot")
            columns = {name: [row.get(name) for row in rows] for name in rows[0]}
            y_name = _column(columns, what, args.field, log)
            label = os.path.splitext(os.path.basename(log))[0]
            ax.plot(columns[X_FIELDS[x]], columns[y_name], marker=".", linewidth=1, label=label)
        ax.set_xlabel(x)
        ax.set_ylabel(f"{kind} {args.field or what}")
        ax.set_title(describe(args.chart_type) if not args.field
                     else f"{kind} {args.field}  vs. {x}")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right" if what in ("loss", "learning rate") else "lower right")
        fmt = os.path.splitext(args.output)[1][1:].lower() or "png"
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=100)
    finally:
        plt.close(fig)
    atomic_write(args.output, buf.getvalue())
    print(f"wrote {args.output}")
    return 0
