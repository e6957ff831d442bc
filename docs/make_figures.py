"""Draw the guide's figures into docs/figures/ (or --out DIR), all from scratch.

    python docs/make_figures.py                      # needs matplotlib: pip install -e ".[docs]"
    python docs/make_figures.py --from-log FILE.log  # first re-read the LeNet curve from a training log

Every number drawn comes from minicaffe itself (im2col, col2im, the bilinear
filler) except the training curve, which comes from docs/figures/lenet_log.csv:
the train and test lines of a real `minicaffe train --log` run of
docs/lenet_1500_solver.prototxt, parsed by `parse_log` below.
"""
import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from minicaffe import Blob, caffe_pb2  # noqa: E402
from minicaffe.fillers import fill  # noqa: E402
from minicaffe.im2col import col2im, conv_output_shape, im2col  # noqa: E402

CSV = HERE / "figures" / "lenet_log.csv"
ITERATIONS = 1500   # max_iter of docs/lenet_1500_solver.prototxt


def parse_log(path):
    """Rows (kind, iteration, loss, accuracy) from a minicaffe/Caffe training log."""
    rows, testing = [], None
    for line in Path(path).read_text().splitlines():
        if m := re.search(r"Iteration (\d+), Testing net", line):
            testing = [int(m.group(1)), "", ""]
            rows.append(("test", *testing))
        elif (m := re.search(r"Test net output #\d+: (loss|accuracy) = ([-\d.e+]+)", line)) and testing:
            testing[1 if m.group(1) == "loss" else 2] = m.group(2)
            rows[-1] = ("test", *testing)
        elif m := re.search(r"Iteration (\d+) \(.*\), loss = ([-\d.e+]+)", line):
            rows.append(("train", int(m.group(1)), m.group(2), ""))
    if not rows:
        raise SystemExit(f"{path}: no 'Iteration N ... loss =' lines: is this a training log?")
    return rows


def write_csv(rows, path=CSV):
    with open(path, "w", newline="") as f:
        f.write(f"# LeNet on MNIST, {ITERATIONS} iterations: parse_log() of a "
                f"`minicaffe train --solver docs/lenet_1500_solver.prototxt --log` run\n")
        writer = csv.writer(f)
        writer.writerow(["kind", "iteration", "loss", "accuracy"])
        writer.writerows(sorted(rows, key=lambda r: (r[0], r[1])))


def read_csv(path=CSV):
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    train = [(int(r["iteration"]), float(r["loss"])) for r in rows if r["kind"] == "train"]
    test = [(int(r["iteration"]), float(r["loss"]), float(r["accuracy"]))
            for r in rows if r["kind"] == "test"]
    return train, test


def _grid(ax, values, fmt="{:g}", cmap="Blues", labels=True):
    ax.imshow(values, cmap=cmap)
    if labels:
        for (r, c), v in np.ndenumerate(values):
            ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))


def im2col_figure(plt, out):
    image = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    cols = im2col(image, (3, 3))                      # (1, 1, 3, 3, 2, 2)
    matrix = cols.reshape(9, 4)
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 4.2), gridspec_kw={"width_ratios": [4, 4]})
    _grid(a, image[0, 0])
    a.set_title("4x4 image, 3x3 kernel, stride 1")
    a.add_patch(plt.Rectangle((-0.5, -0.5), 3, 3, fill=False, ec="red", lw=2))
    a.add_patch(plt.Rectangle((0.5, 0.5), 3, 3, fill=False, ec="orange", lw=2, ls="--"))
    _grid(b, matrix)
    b.set_title("im2col: 9 rows (c, i, j) x 4 columns (window)")
    b.set_xticklabels([f"({oy},{ox})" for oy in range(2) for ox in range(2)])
    b.set_yticklabels([f"(0,{i},{j})" for i in range(3) for j in range(3)])
    b.add_patch(plt.Rectangle((-0.5, -0.5), 1, 9, fill=False, ec="red", lw=2))
    b.add_patch(plt.Rectangle((2.5, -0.5), 1, 9, fill=False, ec="orange", lw=2, ls="--"))
    fig.tight_layout()
    fig.savefig(out / "im2col_matrix.png", dpi=100)


def output_size_figure(plt, out):
    cases = [dict(size=7, kernel=3, pad=1, stride=2, dilation=1),
             dict(size=7, kernel=3, pad=1, stride=1, dilation=2)]
    fig, axes = plt.subplots(len(cases), 1, figsize=(8, 4.4))
    for ax, c in zip(axes, cases):
        s, k, p, st, d = c["size"], c["kernel"], c["pad"], c["stride"], c["dilation"]
        (o,) = conv_output_shape((s,), (k,), p, st, d)
        for x in range(-p, s + p):
            pad = x < 0 or x >= s
            ax.add_patch(plt.Rectangle((x, 0), 0.95, 0.95, color="lightgrey" if pad else "steelblue"))
            ax.text(x + 0.47, 0.47, "0" if pad else f"x{x}", ha="center", va="center",
                    color="black" if pad else "white", fontsize=8)
        for w in range(o):
            y = -0.6 - 0.5 * w
            taps = [w * st - p + i * d for i in range(k)]
            ax.plot([taps[0] + 0.47, taps[-1] + 0.47], [y, y], color="black", lw=1)
            ax.scatter([t + 0.47 for t in taps], [y] * k, color="red", zorder=3, s=18)
            ax.text(taps[-1] + 1.1, y, f"output {w}", va="center", fontsize=8)
        ax.set_xlim(-p - 0.5, s + p + 2.5)
        ax.set_ylim(-0.9 - 0.5 * o, 1.2)
        ax.axis("off")
        ax.set_title(f"H={s}, pad={p}, kernel={k}, stride={st}, dilation={d}:  "
                     f"H_out = ({s} + 2*{p} - ({d}*({k}-1)+1)) // {st} + 1 = {o}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "output_size.png", dpi=100)


def col2im_figure(plt, out):
    cases = [dict(kernel=3, stride=1, pad=0), dict(kernel=3, stride=2, pad=1), dict(kernel=2, stride=2, pad=0)]
    fig, axes = plt.subplots(1, len(cases), figsize=(10, 3.6))
    for ax, c in zip(axes, cases):
        shape = (1, 1, 6, 6)
        (oh, ow) = conv_output_shape(shape[2:], (c["kernel"],) * 2, c["pad"], c["stride"])
        ones = np.ones((1, 1, c["kernel"], c["kernel"], oh, ow), dtype=np.float32)
        counts = col2im(ones, shape, (c["kernel"],) * 2, c["pad"], c["stride"])[0, 0]
        _grid(ax, counts, fmt="{:.0f}", cmap="Oranges")
        ax.set_title(f"kernel {c['kernel']}, stride {c['stride']}, pad {c['pad']}", fontsize=9)
    fig.suptitle("col2im of all-ones columns on a 6x6 image: how many windows cover each pixel")
    fig.tight_layout()
    fig.savefig(out / "col2im_overlap.png", dpi=100)


def bilinear_figure(plt, out):
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    for ax, factor in zip(axes[:2], (2, 3)):
        k = 2 * factor - factor % 2
        blob = Blob((1, 1, k, k))
        fill(blob, caffe_pb2.FillerParameter(type="bilinear"))
        _grid(ax, blob.data[0, 0], fmt="{:.2f}", cmap="Greens")
        ax.set_title(f"factor {factor}: kernel {k}, stride {factor}, pad {int(np.ceil((factor - 1) / 2))}",
                     fontsize=9)
        axes[2].plot(range(k), blob.data[0, 0, k // 2], marker="o", label=f"factor {factor} (row {k // 2})")
    axes[2].set_title("one row of each kernel", fontsize=9)
    axes[2].legend(fontsize=8)
    fig.suptitle('filler { type: "bilinear" }: Deconvolution weights that upsample bilinearly')
    fig.tight_layout()
    fig.savefig(out / "bilinear_kernels.png", dpi=100)


def training_figure(plt, out):
    train, test = read_csv()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot([t[0] for t in train], [t[1] for t in train], label="train loss (one batch of 64)", lw=1)
    ax.plot([t[0] for t in test], [t[1] for t in test], "o-", label="test loss (10,000 images)")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    acc = ax.twinx()
    acc.plot([t[0] for t in test], [t[2] for t in test], "s--", color="green", label="test accuracy")
    acc.set_ylabel("test accuracy")
    acc.set_ylim(0, 1.1)
    for it, _, a in test[1:]:
        acc.annotate(f"{a:.4f}", (it, a), textcoords="offset points", xytext=(0, -13), ha="center",
                     fontsize=7, color="green")
    lines = ax.get_legend_handles_labels()
    more = acc.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize=8)
    ax.set_title(f"LeNet on MNIST, a real minicaffe run of {ITERATIONS} iterations "
                 f"(docs/lenet_1500_solver.prototxt)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "lenet_training.png", dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "figures", help="folder for the PNGs")
    parser.add_argument("--from-log", type=Path, help="rewrite lenet_log.csv from this training log first")
    args = parser.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('make_figures.py needs matplotlib: pip install -e ".[docs]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if args.from_log:
        write_csv(parse_log(args.from_log))
    args.out.mkdir(parents=True, exist_ok=True)
    for draw in (im2col_figure, output_size_figure, col2im_figure, bilinear_figure, training_figure):
        draw(plt, args.out)
        plt.close("all")
    print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
