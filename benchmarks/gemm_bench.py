"""np.matmul (OpenBLAS's own threads) against kernels/gemm.matmul (one-thread sgemm per native worker).

The shapes are products the nets of deploy_bench.py and train_bench.py make: out (M, N) = a (M, K)
@ b (K, N), or a stack of them. Both run in one process, alternated round by round, with the
thread count of --threads for both; medians of the rounds.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/gemm_bench.py --threads 2
"""
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench_common import alternated, in_process_args, print_command, print_table  # noqa: E402

# (name, stack, M, K, N): a stack of products of one shape.
SHAPES = [
    ("ResNet-50 res4 1x1, b1", (), 256, 1024, 196),
    ("ResNet-50 res3 3x3 im2col, b1", (), 128, 1152, 784),
    ("ResNet-50 conv1 im2col, b1", (), 64, 147, 12544),
    ("Winograd F(4x4) 256->256 at 14x14", (36,), 256, 256, 16),
    ("GoogLeNet 4a 1x1, b1", (), 192, 480, 196),
    ("SqueezeNet fire9 expand1x1, b1", (), 256, 64, 169),
    ("CaffeNet fc6, b10", (), 10, 9216, 4096),
    ("CaffeNet conv2 weight grad, b32 (per group)", (2,), 128, 93312, 1200),
    ("ResNet-50 res4 3x3 data grad, b8", (), 2304, 256, 1568),
]


def main():
    args = in_process_args(__doc__.splitlines()[0], 15, "products")
    import minicaffe  # noqa: F401  (before numpy: minicaffe/_blas_env.py sets numpy's BLAS defaults)
    import numpy as np
    from minicaffe import threads
    from minicaffe.kernels import gemm

    threads.set_num_threads(args.threads)
    if not gemm.available():
        sys.exit("gemm_bench: kernels/gemm.py cannot split products here (it needs numba, "
                 "pip install -e '.[fast]', and numpy's own OpenBLAS)")
    rng = np.random.default_rng(0)
    engines = {"np.matmul": lambda a, b, out: np.matmul(a, b, out=out), "gemm.matmul": gemm.matmul}
    rows = []
    for name, stack, m, k, n in SHAPES:
        a = rng.standard_normal(stack + (m, k), dtype=np.float32)
        b = rng.standard_normal(stack + (k, n), dtype=np.float32)
        outs = {e: np.empty(stack + (m, n), np.float32) for e in engines}
        times = {e: [] for e in engines}
        for _, engine in alternated(args.rounds, list(engines)):
            fn, out = engines[engine], outs[engine]
            fn(a, b, out)
            start = time.perf_counter()
            for _ in range(args.repeats):
                fn(a, b, out)
            times[engine].append((time.perf_counter() - start) / args.repeats * 1000)
        # Same products, so the same values up to the order of the sums inside each sgemm call.
        scale = float(np.abs(outs["np.matmul"]).max())
        error = float(np.abs(outs["np.matmul"] - outs["gemm.matmul"]).max()) / scale
        plain, split = (statistics.median(times[e]) for e in engines)
        shape = "x".join(map(str, stack + (m, k, n)))
        rows.append([name, shape, f"{plain:.3f}", f"{split:.3f}", f"{plain / split:.2f}x", f"{error:.0e}"])
    print_command(__file__)
    print(f"{args.threads} threads, median ms of {args.rounds} alternated rounds of {args.repeats} products")
    print_table(["product", "stack x M x K x N", "np.matmul ms", "gemm.matmul ms", "speedup", "max rel. diff"], rows)


if __name__ == "__main__":
    main()
