"""MAX pooling at TRAIN, forward and backward: the phase grid's numpy path against its compiled one.

The shapes are the MAX pools of train_bench.py's nets at their batch sizes. Both paths run in one
process, alternated round by round, on --threads threads; medians of the rounds.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/pool_bench.py --threads 2
"""
import argparse
import os
import statistics
import sys
import time

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
    rng = __import__("numpy").random.default_rng(0)
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    parser.add_argument("--rounds", type=int, default=9, help="alternated rounds (default 9)")
    parser.add_argument("--repeats", type=int, default=5, help="steps timed per round (default 5)")
    args = parser.parse_args()
    if min(args.threads, args.rounds, args.repeats) < 1:
        parser.error("--threads, --rounds and --repeats must be at least 1")
    os.environ["OMP_NUM_THREADS"] = os.environ["MINICAFFE_THREADS"] = str(args.threads)
    from minicaffe.kernels import jit
    if not jit.available():
        sys.exit(f"pool_bench compares the numpy and compiled paths: {jit.INSTALL_HINT}")
    print(f"$ python benchmarks/pool_bench.py --threads {args.threads} --rounds {args.rounds} "
          f"--repeats {args.repeats}")
    print("MAX pooling at TRAIN, ms per forward / backward: medians of alternated rounds\n")
    print("| pool | input | numpy fwd | numpy bwd | compiled fwd | compiled bwd | backward speedup |")
    print("|---|---|---|---|---|---|---|")
    for name, shape, kernel, stride, pad in SHAPES:
        layers = {}
        for path in ("numpy", "compiled"):
            jit.set_enabled(path == "compiled")
            layers[path] = make_layer(shape, kernel, stride, pad)
            time_steps(*layers[path], 1)   # warm-up (and the compile)
        times = {path: [] for path in layers}
        for _ in range(args.rounds):
            for path, (layer, bottom, top) in layers.items():
                jit.set_enabled(path == "compiled")
                times[path].append(time_steps(layer, bottom, top, args.repeats))
        med = {path: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
               for path, ts in times.items()}
        (nf, nb), (cf, cb) = med["numpy"], med["compiled"]
        print(f"| {name} | {'x'.join(map(str, shape))} k{kernel} s{stride} p{pad} | {nf:.3f} | "
              f"{nb:.3f} | {cf:.3f} | {cb:.3f} | {nb / cb:.2f}x |")


if __name__ == "__main__":
    main()
