"""LeNet training throughput: 1 process x 2 BLAS threads against 2 MPI processes x 1 thread.

Each configuration trains LeNet (batch 64 per process, MNIST-shaped random data in a
MemoryData layer, SGD) for --iters iterations after --warmup, and reports images/s
counted over all processes (2 processes train on 2 x 64 images per iteration). The
scaling efficiency is the 2-process rate over the 1-process-2-thread rate: what the
same two cores give either way.

    python benchmarks/mpi_bench.py                 # both configurations, then the table
    python benchmarks/mpi_bench.py --iters 50 --batch 64
Needs the mpi extra: pip install 'minicaffe[mpi]'.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

LENET = """name: "LeNet"
layer {{ name: "data" type: "MemoryData" top: "data" top: "label"
  memory_data_param {{ batch_size: {batch} channels: 1 height: 28 width: 28 }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 20 kernel_size: 5 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param {{ num_output: 50 kernel_size: 5 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  inner_product_param {{ num_output: 500 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""


def worker(args):
    from google.protobuf import text_format
    import minicaffe
    from minicaffe import parallel
    from minicaffe.proto import caffe_pb2
    comm = parallel.init()
    param = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9, weight_decay=5e-4,
                                      lr_policy="inv", gamma=1e-4, power=0.75, type="SGD",
                                      max_iter=10 ** 6, random_seed=1)
    param.net_param.CopyFrom(text_format.Parse(LENET.format(batch=args.batch),
                                               caffe_pb2.NetParameter()))
    solver = minicaffe.get_solver(param)
    rng = np.random.default_rng(comm.Get_rank())
    n = args.batch * 4
    rows = n * comm.Get_size()   # MemoryData keeps every size-th row from this rank's on
    solver.net.layers[0].set_input_arrays(rng.random((rows, 1, 28, 28), dtype=np.float32),
                                          rng.integers(0, 10, rows).astype(np.float32))
    parallel.data_parallel(solver)
    solver.step(args.warmup)
    comm.Barrier()
    start = time.perf_counter()
    solver.step(args.iters)
    comm.Barrier()
    elapsed = time.perf_counter() - start
    if comm.Get_rank() == 0:
        print(f"RESULT {args.iters * args.batch * comm.Get_size() / elapsed:.1f}", flush=True)


def run(nproc, threads, args):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep +
                          env.get("PATH", ""))
    if mpirun is None:
        sys.exit("mpi_bench: no mpirun; pip install 'minicaffe[mpi]'")
    cmd = [mpirun, "-n", str(nproc), "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, os.path.abspath(__file__), "--worker", "--iters", str(args.iters),
            "--warmup", str(args.warmup), "--batch", str(args.batch)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return float(line.split()[1]), " ".join(cmd[:1] + cmd[1:])
    sys.exit(f"mpi_bench: {nproc} x {threads} failed:\n{out.stderr[-2000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="batch per process")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    single, _ = run(1, 1, args)
    one, _ = run(1, 2, args)
    two, cmd = run(2, 1, args)
    print(f"LeNet, batch {args.batch} per process, {args.iters} SGD iterations, "
          f"{os.cpu_count()} CPUs")
    print(f"{'configuration':<28}{'images/s':>10}")
    print(f"{'1 process x 1 BLAS thread':<28}{single:>10.1f}")
    print(f"{'1 process x 2 BLAS threads':<28}{one:>10.1f}")
    print(f"{'2 processes x 1 BLAS thread':<28}{two:>10.1f}")
    print(f"2 x 1 over 1 x 2: {two / one:.2f}; scaling efficiency over 1 x 1: "
          f"{two / (2 * single):.2f}")
    print(f"worker command: {cmd}")


if __name__ == "__main__":
    main()
