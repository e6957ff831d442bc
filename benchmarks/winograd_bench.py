"""Time Convolution forward with im2col + GEMM against Winograd F(2x2,3x3) and F(4x4,3x3).

Each shape is one 3x3 pad-1 stride-1 TEST-phase Convolution layer with well-scaled random
weights; the three variants run in alternated rounds in one process on the same data, and the
table shows median ms per forward, the speedup over plain, and what the "auto" rule picks
(minicaffe/kernels/winograd.py: choose_tile).

    OMP_NUM_THREADS=1 python benchmarks/winograd_bench.py
    python benchmarks/winograd_bench.py --rounds 9 --only resnet
    OMP_NUM_THREADS=1 python benchmarks/winograd_bench.py --nets resnet50,vgg16

--nets times whole deploy nets of ../shared/models/bench at their benchmarks/deploy_bench.py
batch and weights, as `Net(..., inference=True)`, with every Convolution's `winograd` set to
"auto" or False in alternated rounds of one net, and prints the largest relative difference of
the final scores.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minicaffe.blob import Blob  # noqa: E402
from minicaffe.layer_factory import create_layer  # noqa: E402
from minicaffe.proto import caffe_pb2  # noqa: E402

# name: (N, C, H, W), num_output
SHAPES = {
    "vgg16 conv1_1": ((1, 3, 224, 224), 64),
    "vgg16 conv1_2": ((1, 64, 224, 224), 64),
    "vgg16 conv2_x": ((1, 128, 112, 112), 128),
    "vgg16 conv3_x": ((1, 256, 56, 56), 256),
    "vgg16 conv4_x": ((1, 512, 28, 28), 512),
    "vgg16 conv5_x": ((1, 512, 14, 14), 512),
    "resnet50 conv2_x 3x3": ((1, 64, 56, 56), 64),
    "resnet50 conv3_x 3x3": ((1, 128, 28, 28), 128),
    "resnet50 conv4_x 3x3": ((1, 256, 14, 14), 256),
    "resnet50 conv4_x 3x3 b10": ((10, 256, 14, 14), 256),
    "resnet50 conv5_x 3x3": ((1, 512, 7, 7), 512),
    "resnet50 conv5_x 3x3 b4": ((4, 512, 7, 7), 512),
    "squeezenet fire2 expand3x3": ((1, 16, 55, 55), 64),
    "squeezenet fire4 expand3x3": ((1, 32, 27, 27), 128),
    "squeezenet fire6 expand3x3": ((1, 48, 13, 13), 192),
    "squeezenet fire8 expand3x3": ((1, 64, 13, 13), 256),
    "googlenet conv2 3x3": ((1, 64, 56, 56), 192),
    "googlenet 3a 3x3": ((1, 96, 28, 28), 128),
    "googlenet 4a 3x3": ((1, 96, 14, 14), 208),
    "small 16ch": ((1, 16, 32, 32), 16),
    "small 3ch": ((1, 3, 32, 32), 16),
}
VARIANTS = {"plain": False, "F(2x2)": 2, "F(4x4)": 4}


def make_layer(shape, num_output, setting, rng):
    param = caffe_pb2.LayerParameter(name="conv", type="Convolution")
    cp = param.convolution_param
    cp.num_output, cp.pad[:], cp.kernel_size[:] = num_output, [1], [3]
    layer = create_layer(param, caffe_pb2.TEST)
    layer.winograd = setting
    bottom, top = [Blob(shape)], [Blob()]
    layer.setup(bottom, top)
    layer.blobs[0].data[...] = rng.standard_normal(layer.blobs[0].shape) / np.sqrt(9 * shape[1])
    layer.blobs[1].data[...] = rng.standard_normal(num_output)
    return layer, bottom, top


def time_net(name, rounds):
    import tempfile
    import pathlib

    import minicaffe
    from minicaffe.layers.conv import ConvolutionLayer
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import deploy_bench

    prototxt, batch = {n: (p, b) for n, p, b in deploy_bench.NETS}[name]
    with tempfile.TemporaryDirectory() as tmp:
        spec = deploy_bench.make_weights(deploy_bench.BENCH / prototxt, batch, pathlib.Path(tmp))
        net = minicaffe.Net(spec["prototxt"], minicaffe.TEST, weights=spec["weights"], inference=True,
                            keep_blobs=[spec["blob"]])
        x = np.load(spec["inputs"])
    # The layers forward runs: inference nets run copies of the layers they fold BatchNorm into.
    convs = [l for _, l, _, _ in net.forward_plan() if isinstance(l, ConvolutionLayer)]

    def run(setting):
        for layer in convs:
            layer.winograd = setting
        net.reshape()
        net.blobs[net.inputs[0]].data[...] = x
        t0 = time.perf_counter()
        net.forward()
        return time.perf_counter() - t0, net.blobs[spec["blob"]].data.copy()

    times = {"auto": [], False: []}
    outs = {}
    run("auto")   # warm up
    used = sum(l._winograd is not None for l in convs)
    run(False)
    for _ in range(rounds):
        for setting in times:
            t, outs[setting] = run(setting)
            times[setting].append(t)
    ms = {k: 1000 * float(np.median(v)) for k, v in times.items()}
    diff = float(np.abs(outs["auto"] - outs[False]).max() / np.abs(outs[False]).max())
    print(f"{name:12s} batch {batch:2d}: plain {ms[False]:8.1f} ms, winograd auto {ms['auto']:8.1f} ms "
          f"({ms[False] / ms['auto']:.2f}x), {used} of {len(convs)} convolutions on Winograd, "
          f"max rel diff {diff:.1e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", help="run the shapes whose name contains this")
    ap.add_argument("--nets", help="comma-separated deploy nets (deploy_bench.py names) instead of layers")
    args = ap.parse_args()
    print("command: OMP_NUM_THREADS=%s python benchmarks/winograd_bench.py --rounds %d%s%s"
          % (os.environ.get("OMP_NUM_THREADS", "<unset>"), args.rounds,
             f" --only {args.only!r}" if args.only else "", f" --nets {args.nets}" if args.nets else ""))
    if args.nets:
        for name in args.nets.split(","):
            time_net(name, args.rounds)
        return
    print(f"{'layer':28s} {'shape':>18s} {'plain':>8s} {'F(2x2)':>8s} {'F(4x4)':>8s}"
          f" {'x F2':>6s} {'x F4':>6s}  auto")
    for name, (shape, num_output) in SHAPES.items():
        if args.only and args.only not in name:
            continue
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape).astype(np.float32)
        runs = {}
        for variant, setting in VARIANTS.items():
            layer, bottom, top = make_layer(shape, num_output, setting, np.random.default_rng(1))
            bottom[0].data[...] = x
            layer.forward(bottom, top)   # warm up scratch and the transformed weights
            runs[variant] = (layer, bottom, top)
        auto = make_layer(shape, num_output, "auto", rng)[0]._winograd
        times = {v: [] for v in runs}
        for _ in range(args.rounds):
            for variant, (layer, bottom, top) in runs.items():
                t0 = time.perf_counter()
                layer.forward(bottom, top)
                times[variant].append(time.perf_counter() - t0)
        ms = {v: 1000 * float(np.median(t)) for v, t in times.items()}
        pick = f"F({auto.m}x{auto.m})" if auto is not None else "plain"
        print(f"{name:28s} {'x'.join(map(str, shape)) + '->' + str(num_output):>18s} "
              f"{ms['plain']:8.2f} {ms['F(2x2)']:8.2f} {ms['F(4x4)']:8.2f} "
              f"{ms['plain'] / ms['F(2x2)']:6.2f} {ms['plain'] / ms['F(4x4)']:6.2f}  {pick}")


if __name__ == "__main__":
    main()
