"""MAX pooling at TRAIN, forward and backward: the phase grid's numpy path against its compiled one.

The shapes are the MAX pools of train_bench.py's nets at their batch sizes. Both paths run in one
process, alternated round by round, on --threads threads; medians of the rounds.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/pool_bench.py --threads 2
"""
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench_common import alternated, in_process_args, print_command, print_table  # noqa: E402

# (name, input shape, kernel, stride, pad)
SHAPES = [
    ("LeNet pool1, b64", (64, 20, 24, 24), 2, 2, 0),
    ("LeNet pool2, b64", (64, 50, 8, 8), 2, 2, 0),
    ("CaffeNet pool1, b32", (32, 96, 55, 55), 3, 2, 0),
    ("CaffeNet pool2, b32", (32, 256, 27, 27), 3, 2, 0),
    ("ResNet-50 pool1, b8", (8, 64, 112, 112), 3, 2, 0),
    ("GoogLeNet-style 3x3 s1 pad 1, b8", (8, 192, 28, 28), 3, 1, 1),
]


def make_layer(shape, kernel, stride, pad):
    import numpy as np
    from google.protobuf import text_format

    from minicaffe.blob import Blob
    from minicaffe.layer_factory import create_layer
    from minicaffe.proto import caffe_pb2
    param = text_format.Parse(
        f'name: "pool" type: "Pooling" pooling_param {{ pool: MAX kernel_size: {kernel} '
        f'stride: {stride} pad: {pad} }}', caffe_pb2.LayerParameter())
    layer = create_layer(param, caffe_pb2.TRAIN)
    bottom, top = Blob(shape), Blob()
    layer.setup([bottom], [top])
    rng = np.random.default_rng(0)
    bottom.data[...] = rng.standard_normal(shape)
    top.diff[...] = rng.standard_normal(top.shape)
    return layer, bottom, top


def time_steps(layer, bottom, top, repeats):
    forward = backward = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        layer.forward([bottom], [top])
        middle = time.perf_counter()
        layer.backward([top], [True], [bottom])
        end = time.perf_counter()
        forward += middle - start
        backward += end - middle
    return forward / repeats * 1e3, backward / repeats * 1e3


def main():
    args = in_process_args(__doc__.splitlines()[0], 9, "steps")
    from minicaffe import threads
    from minicaffe.kernels import jit
    if not jit.available():
        sys.exit(f"pool_bench compares the numpy and compiled paths: {jit.INSTALL_HINT}")
    threads.set_num_threads(args.threads)
    paths = ["numpy", "compiled"]
    rows = []
    for name, shape, kernel, stride, pad in SHAPES:
        layers = {}
        for path in paths:
            jit.set_enabled(path == "compiled")   # read at setup: the layer keeps its path
            layers[path] = make_layer(shape, kernel, stride, pad)
            time_steps(*layers[path], 1)          # warm-up (and the compile)
        times = {path: [] for path in paths}
        for _, path in alternated(args.rounds, paths):
            jit.set_enabled(path == "compiled")
            times[path].append(time_steps(*layers[path], args.repeats))
        (nf, nb), (cf, cb) = ((statistics.median(t[0] for t in times[path]),
                               statistics.median(t[1] for t in times[path])) for path in paths)
        rows.append([name, f"{'x'.join(map(str, shape))} k{kernel} s{stride} p{pad}", f"{nf:.3f}",
                     f"{nb:.3f}", f"{cf:.3f}", f"{cb:.3f}", f"{nb / cb:.2f}x"])
    print_command(__file__)
    print(f"MAX pooling at TRAIN, {args.threads} threads, median ms per forward / backward of "
          f"{args.rounds} alternated rounds of {args.repeats} steps")
    print_table(["pool", "input", "numpy fwd", "numpy bwd", "compiled fwd", "compiled bwd",
                 "backward speedup"], rows)


if __name__ == "__main__":
    main()
