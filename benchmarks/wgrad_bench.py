"""Convolution weight-gradient paths switched on and off inside one training process.

Between processes, these 2-core shared machines drift by more than the paths differ (a LeNet step
moved 11-16 ms over one afternoon), so this runs ONE minicaffe training process (train_bench's nets,
data and solver) and switches the two weight-gradient choices of layers/conv.py every few steps:

  transposed   flipped_weight_grad: (C_out, K) gradients with K > C_out over long pixel axes are
               computed as their (K, C_out) transpose;
  per-image    small-K gradients summed from one GEMM per image reading dout in place.

    python benchmarks/wgrad_bench.py                         # LeNet batch 64
    python benchmarks/wgrad_bench.py --net resnet50 --rounds 5 --steps 2
"""
import argparse
import itertools
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import minicaffe  # noqa: E402  (before numpy: minicaffe/_blas_env.py sets numpy's BLAS defaults)

import train_bench  # noqa: E402
from _bench_common import SHARED, print_table  # noqa: E402
from minicaffe.layers import conv  # noqa: E402

CONFIGS = list(itertools.product((False, True), repeat=2))   # (transposed, per-image)


def main():
    names = [n for n, _, _, _ in train_bench.NETS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="lenet", choices=names)
    parser.add_argument("--batch", type=int, help="default: train_bench's batch for the net")
    parser.add_argument("--rounds", type=int, default=30, help="rounds; each runs every setting (default 30)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting and round (default 10)")
    parser.add_argument("--mnist", default=str(SHARED / "data" / "mnist"), help="folder of the MNIST IDX files")
    args = parser.parse_args()
    if min(args.rounds, args.steps, args.batch or 1) < 1:
        parser.error("--rounds, --steps and --batch must be at least 1")
    batch = args.batch or {n: b for n, _, b, _ in train_bench.NETS}[args.net]
    with tempfile.TemporaryDirectory() as tmp:
        step = train_bench.minicaffe_trainer(train_bench.prepare(args.net, batch, pathlib.Path(tmp), args.mnist))
    layers = [layer for layer in step.solver.net.layers if isinstance(getattr(layer, "gemm", None), conv.ConvGemm)]
    # Where the per-image path applies, its scratch is sized at reshape; switching it off reuses that.
    per_image_layers = [layer.gemm for layer in layers if layer.gemm._per_image_weight_grad]
    depth = conv.FLIPPED_WEIGHT_GRAD_MIN_DEPTH

    def choose(transposed, per_image):
        conv.FLIPPED_WEIGHT_GRAD_MIN_DEPTH = depth if transposed else float("inf")
        for gemm in per_image_layers:
            gemm._per_image_weight_grad = per_image

    times, i = {c: [] for c in CONFIGS}, 0
    for _ in range(3):
        step(i)
        i += 1
    for r in range(args.rounds):
        for config in CONFIGS if r % 2 == 0 else CONFIGS[::-1]:
            choose(*config)
            step(i)   # untimed: the switch's first step
            i += 1
            for _ in range(args.steps):
                start = time.perf_counter()
                step(i)
                times[config].append((time.perf_counter() - start) * 1000)
                i += 1
    choose(True, True)
    print(f"$ python benchmarks/wgrad_bench.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{args.net} batch {batch}: training-step ms, median of {args.rounds} rounds x {args.steps} steps "
          f"per setting, all in one process; per-image applies to "
          f"{', '.join(layer.name for layer in layers if layer.gemm in per_image_layers) or 'no layer'}")
    both_off = statistics.median(times[(False, False)])
    print_table(["transposed", "per-image", "ms/step", "vs neither"],
                [["on" if t else "off", "on" if p else "off", f"{statistics.median(times[(t, p)]):.2f}",
                  f"{statistics.median(times[(t, p)]) / both_off:.3f}"] for t, p in CONFIGS])


if __name__ == "__main__":
    main()
