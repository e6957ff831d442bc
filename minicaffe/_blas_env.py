"""Environment defaults for numpy's BLAS, set before numpy is first imported (they are read once,
when OpenBLAS loads; a value the user set is kept).

OPENBLAS_THREAD_TIMEOUT: after a GEMM, OpenBLAS's worker threads spin for 2^n cycles before they
sleep (n = 28 by default, about a tenth of a second). minicaffe's memory-bound passes (BatchNorm,
ReLU, pooling, im2col, the solver update) run right after GEMMs on minicaffe.threads' pool, whose
workers then share the cores with spinning BLAS threads and gain nothing: one such pass ran in
812 us on one thread and 892 us on two after a GEMM, 547 us on two with n = 4. n = 18 (about
0.1 ms of spin) frees the cores for the passes of a training step. Measured side by side on
this project's 2-core machine (one process per setting, alternated): a ResNet-50 training step at
batch 8 went from 1167 to 1020 ms and CaffeNet's at batch 32 from 851 to 784 ms; LeNet's step
stayed within the noise. It costs batch-1 inference: GoogLeNet, SqueezeNet and MobileNet v1 ran
3-8% slower in `benchmarks/deploy_bench.py` (their GEMMs are further apart than the spin, so the
BLAS threads sleep and are woken for each), as they did with n = 20; a deploy-only user who wants
that back sets OPENBLAS_THREAD_TIMEOUT=28 (OpenBLAS's default) before starting Python. The
benchmarks print the value their children ran with.
"""
import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")
