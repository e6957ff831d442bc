"""Memory-bound layers at 1 thread against N threads of the shared pool (minicaffe.threads).

    OMP_NUM_THREADS=1 python benchmarks/threads_bench.py [--threads 2] [--rounds 7]

Each row runs one real layer (float32, the shapes of LeNet, ResNet-50, CaffeNet, GoogLeNet and
an FCN-sized softmax) forward or backward, timed as the mean of a few calls; the 1-thread and
the N-thread timings alternate round by round, and the table shows the medians. The first row
is the pool's bare hand-off: a parallel_for of two empty blocks, forced to split. Rows whose
work is under the split threshold run the same inline code in both columns, so their spread
shows the machine's noise.

--min-elements E sets threads.MIN_PARALLEL_ELEMENTS (1 splits everything, which shows where
splitting stops paying); --after-gemm runs a 512x512 matrix product before every timed call,
as a net does (the BLAS threads may still be spinning when the layer starts).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
from google.protobuf import text_format

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minicaffe import Blob, create_layer, set_random_seed, threads  # noqa: E402
from minicaffe.proto import caffe_pb2  # noqa: E402

RELU = 'type: "ReLU"'
SUM = 'type: "Eltwise"'

# (net, what, layer prototxt, bottom shapes, pass, in place)
CASES = [
    ("LeNet b64", "relu1", RELU, [(64, 500)], "forward", True),
    ("LeNet b64", "loss", 'type: "SoftmaxWithLoss"', [(64, 10), (64,)], "forward", False),
    ("ResNet-50 b1", "conv1 relu", RELU, [(1, 64, 112, 112)], "forward", True),
    ("ResNet-50 b1", "res2 relu", RELU, [(1, 256, 56, 56)], "forward", True),
    ("ResNet-50 b1", "res3 relu", RELU, [(1, 512, 28, 28)], "forward", True),
    ("ResNet-50 b1", "res4 relu", RELU, [(1, 1024, 14, 14)], "forward", True),
    ("ResNet-50 b1", "res5 relu", RELU, [(1, 2048, 7, 7)], "forward", True),
    ("ResNet-50 b1", "res2 eltwise", SUM, [(1, 256, 56, 56)] * 2, "forward", False),
    ("ResNet-50 b1", "res4 eltwise", SUM, [(1, 1024, 14, 14)] * 2, "forward", False),
    ("ResNet-50 b8", "res2 relu", RELU, [(8, 256, 56, 56)], "forward", True),
    ("ResNet-50 b8", "res2 relu", RELU, [(8, 256, 56, 56)], "backward", True),
    ("ResNet-50 b8", "res2 eltwise", SUM, [(8, 256, 56, 56)] * 2, "backward", False),
    ("ResNet-50 b8", "res2 split", 'type: "Split" top: "a" top: "b"', [(8, 256, 56, 56)],
     "backward", False),
    ("CaffeNet b10", "relu1", RELU, [(10, 96, 55, 55)], "forward", True),
    ("CaffeNet b10", "relu2", RELU, [(10, 256, 27, 27)], "forward", True),
    ("CaffeNet b10", "relu3", RELU, [(10, 384, 13, 13)], "forward", True),
    ("CaffeNet b10", "relu6", RELU, [(10, 4096)], "forward", True),
    ("CaffeNet b10", "prob", 'type: "Softmax"', [(10, 1000)], "forward", False),
    ("CaffeNet b32", "relu1", RELU, [(32, 96, 55, 55)], "forward", True),
    ("CaffeNet b32", "relu1", RELU, [(32, 96, 55, 55)], "backward", True),
    ("CaffeNet b32", "drop6", 'type: "Dropout"', [(32, 4096)], "forward", False),
    ("GoogLeNet b1", "3a concat", 'type: "Concat"',
     [(1, 64, 28, 28), (1, 128, 28, 28), (1, 32, 28, 28), (1, 32, 28, 28)], "forward", False),
    ("GoogLeNet b10", "3a concat", 'type: "Concat"',
     [(10, 64, 28, 28), (10, 128, 28, 28), (10, 32, 28, 28), (10, 32, 28, 28)], "backward",
     False),
    ("LSTM-ish", "sigmoid", 'type: "Sigmoid"', [(10, 96, 55, 55)], "forward", True),
    ("LSTM-ish", "tanh", 'type: "TanH"', [(10, 96, 55, 55)], "forward", True),
    ("FCN-8s 500x500", "softmax", 'type: "Softmax"', [(1, 21, 500, 500)], "forward", False),
]


def build(text, shapes, in_place):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    param.name = "layer"
    layer = create_layer(param, caffe_pb2.TRAIN)
    rng = np.random.default_rng(0)
    bottom = [Blob(s, dtype=np.float32) for s in shapes]
    for b in bottom:
        b.data[...] = rng.uniform(-1, 1, b.shape)
    if param.type == "SoftmaxWithLoss":
        bottom[1].data[...] = rng.integers(0, shapes[0][1], shapes[1])
    tops = max(1, len(param.top))
    top = bottom[:1] if in_place else [Blob((), dtype=np.float32) for _ in range(tops)]
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    for t in top:
        t.diff[...] = rng.uniform(-1, 1, t.shape)
    down = [True] + [param.type != "SoftmaxWithLoss"] * (len(bottom) - 1)
    return layer, bottom, top, down


def timer(call, reps, gemm):
    """Mean seconds of one call, with an optional matrix product (untimed) before each."""
    if gemm is None:
        start = time.perf_counter()
        for _ in range(reps):
            call()
        return (time.perf_counter() - start) / reps
    total = 0.0
    for _ in range(reps):
        np.matmul(*gemm[:2], out=gemm[2])
        start = time.perf_counter()
        call()
        total += time.perf_counter() - start
    return total / reps


def measure(call, count, rounds, gemm):
    """Median ms at 1 thread and at `count` threads, alternating (and swapping the order)."""
    threads.set_num_threads(1)
    start = time.perf_counter()
    call()
    reps = max(3, min(2000, int(0.02 / max(time.perf_counter() - start, 1e-6))))
    times = {1: [], count: []}
    for r in range(rounds):
        for c in ((1, count) if r % 2 == 0 else (count, 1)):
            threads.set_num_threads(c)
            call()   # untimed: starts the workers again
            times[c].append(timer(call, reps, gemm))
    return statistics.median(times[1]) * 1e3, statistics.median(times[count]) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="the N of the N-thread column (default: the number of cores)")
    parser.add_argument("--rounds", type=int, default=7, help="alternated rounds (default 7)")
    parser.add_argument("--min-elements", type=int, default=None,
                        help=f"threads.MIN_PARALLEL_ELEMENTS (default "
                             f"{threads.MIN_PARALLEL_ELEMENTS})")
    parser.add_argument("--after-gemm", action="store_true",
                        help="run a 512x512 matmul before each timed call")
    parser.add_argument("--only", default="", help="comma-separated substrings of the rows to run")
    args = parser.parse_args(argv)
    if args.threads < 2:
        parser.error("--threads must be at least 2 to compare against 1")
    if args.min_elements is not None:
        threads.MIN_PARALLEL_ELEMENTS = args.min_elements
    gemm = None
    if args.after_gemm:
        a = np.random.default_rng(1).random((512, 512), dtype=np.float32)
        gemm = (a, a, np.empty_like(a))
    set_random_seed(1)

    n = args.threads
    print(f"| net | layer | pass | shape | 1 thread ms | {n} threads ms | speedup |")
    print("|---|---|---|---|---|---|---|")
    saved = threads.MIN_PARALLEL_ELEMENTS
    threads.MIN_PARALLEL_ELEMENTS = 1
    one, many = measure(lambda: threads.parallel_for(2, lambda lo, hi: None, 1), n,
                        args.rounds, gemm)
    threads.MIN_PARALLEL_ELEMENTS = saved
    print(f"| - | pool hand-off | - | 2 empty blocks | {one:.4f} | {many:.4f} | {one / many:.2f}x |")
    only = [s for s in args.only.split(",") if s]
    for net, what, text, shapes, direction, in_place in CASES:
        label = f"{net} {what} {direction}"
        if only and not any(s in label for s in only):
            continue
        layer, bottom, top, down = build(text, shapes, in_place)
        if direction == "forward":
            call = lambda: layer.forward(bottom, top)  # noqa: E731
        else:
            call = lambda: layer.backward(top, down, bottom)  # noqa: E731
        with np.errstate(all="ignore"):
            one, many = measure(call, n, args.rounds, gemm)
        shape = "x".join(map(str, shapes[0])) + (f" (x{len(shapes)})" if len(shapes) > 1 else "")
        print(f"| {net} | {what} | {direction} | {shape} | {one:.3f} | {many:.3f} | "
              f"{one / many:.2f}x |", flush=True)
    flags = " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    print(f"\ncommand: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python "
          f"benchmarks/threads_bench.py {flags}".rstrip())
    print(f"threads.MIN_PARALLEL_ELEMENTS = {threads.MIN_PARALLEL_ELEMENTS}, "
          f"BLOCKS_PER_THREAD = {threads.BLOCKS_PER_THREAD}, numpy {np.__version__}, "
          f"{os.cpu_count()} cores")


if __name__ == "__main__":
    main()
