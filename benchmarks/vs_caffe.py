"""minicaffe against a C++ Caffe binary, side by side on one machine.

Alternates `caffe time` and `minicaffe time` on the same prototxt (or `caffe train` and
`minicaffe train` on the same solver) and prints medians and paired ratios; ratio < 1 means
minicaffe is faster. Caffe itself is not part of minicaffe: point --caffe at your own build.

    python benchmarks/vs_caffe.py --caffe /path/to/caffe time models/lenet/lenet_train_test.prototxt
    python benchmarks/vs_caffe.py --caffe /path/to/caffe train my_solver.prototxt

Run from the repository root after `minicaffe data mnist ... --out data/mnist`. For `train`,
use a short solver (e.g. LeNet's with max_iter 500, snapshot 0, snapshot_after_train false).
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

from _bench_common import iteration_stamps

LAYER = re.compile(r"\]\s+(\S+)\s+(forward|backward): ([\d.e+-]+) ms")
TOTAL = re.compile(r"Average Forward-Backward: ([\d.]+) ms")


def run(cmd, env):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out[-2000:]}")
    return out


def time_scores(out):
    scores = {f"{m[1]} {m[2]}": float(m[3]) for m in LAYER.finditer(out)}
    scores["total forward-backward"] = float(TOTAL.search(out).group(1))
    return scores


def train_scores(out):
    """ms per iteration between the first and last `Iteration N (...)` display lines; with
    test_interval beyond them (as in a max_iter 500, test_interval 500 solver) no test runs between."""
    marks = sorted(iteration_stamps(out).items())
    (i0, t0), (i1, t1) = marks[0], marks[-1]
    return {"train ms/iter": (t1 - t0) * 1000 / max(1, i1 - i0)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caffe", default=os.environ.get("CAFFE_BIN"), required="CAFFE_BIN" not in os.environ,
                        help="path to the caffe binary (or set CAFFE_BIN)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=50, help="for time")
    parser.add_argument("--threads", default="2", help="OMP/OpenBLAS threads for both programs")
    parser.add_argument("--phase", default="TRAIN", choices=["TRAIN", "TEST"], help="for time")
    parser.add_argument("mode", choices=["time", "train"])
    parser.add_argument("file", help="net prototxt (time) or solver prototxt (train)")
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=args.threads, OPENBLAS_NUM_THREADS=args.threads)
    if args.mode == "time":
        caffe_cmd = [args.caffe, "time", "-model", args.file, "-iterations", str(args.iterations),
                     "-phase", args.phase]
        mini_cmd = [sys.executable, "-m", "minicaffe", "time", "--model", args.file,
                    "--iterations", str(args.iterations), "--phase", args.phase]
        score, key = time_scores, "total forward-backward"
    else:
        caffe_cmd = [args.caffe, "train", "-solver", args.file]
        mini_cmd = [sys.executable, "-m", "minicaffe", "train", "--solver", args.file, "--no-progress"]
        score, key = train_scores, "train ms/iter"
    caffe, mini = [], []
    for rep in range(args.reps):
        caffe.append(score(run(caffe_cmd, env)))
        mini.append(score(run(mini_cmd, env)))
        print(f"rep {rep}: caffe {caffe[-1][key]:.2f} ms  minicaffe {mini[-1][key]:.2f} ms", flush=True)
    print(f"\n{' '.join(sys.argv)}\nthreads={args.threads} reps={args.reps} (medians; ratio = minicaffe / caffe)")
    print(f"{'':28} {'caffe ms':>10} {'minicaffe ms':>13} {'ratio':>7}")
    for name in caffe[0]:
        if name in mini[0]:
            c = statistics.median(r[name] for r in caffe)
            m = statistics.median(r[name] for r in mini)
            print(f"{name:28} {c:10.2f} {m:13.2f} {m / c if c else float('nan'):7.2f}")
    paired = [m[key] / c[key] for c, m in zip(caffe, mini)]
    print(f"paired {key} ratios: {' '.join(f'{r:.2f}' for r in paired)}  median {statistics.median(paired):.2f}")


if __name__ == "__main__":
    main()
