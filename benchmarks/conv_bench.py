"""Time minicaffe's batched Convolution layer against a Caffe-style per-image loop.

The baseline does what Caffe's CPU code does: for each image, im2col that image,
one GEMM per group, add the bias; backward recomputes the image's columns, adds
its weight gradient, multiplies by the transposed weights and col2im's back.
Both run in the same process on the same data, float32, forward and backward
(weights, bias and bottom gradients), in interleaved rounds; the table shows
median times and the median of the per-round speedups (per-image / batched).

    python benchmarks/conv_bench.py                 # LeNet + CaffeNet conv layers
    python benchmarks/conv_bench.py --rounds 9 --only lenet
"""
import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minicaffe.blob import Blob  # noqa: E402
from minicaffe.im2col import col2im, conv_output_shape, im2col  # noqa: E402
from minicaffe.layer_factory import create_layer  # noqa: E402
from minicaffe.proto import caffe_pb2  # noqa: E402

# name: (input shape N, C, H, W; num_output, kernel, stride, pad, group)
SHAPES = {
    "lenet conv1": ((64, 1, 28, 28), 20, 5, 1, 0, 1),
    "lenet conv2": ((64, 20, 12, 12), 50, 5, 1, 0, 1),
    "caffenet conv1": ((10, 3, 227, 227), 96, 11, 4, 0, 1),
    "caffenet conv2": ((10, 96, 27, 27), 256, 5, 1, 2, 2),
    "caffenet conv3": ((10, 256, 13, 13), 384, 3, 1, 1, 1),
    "caffenet conv4": ((10, 384, 13, 13), 384, 3, 1, 1, 2),
    "caffenet conv5": ((10, 384, 13, 13), 256, 3, 1, 1, 2),
}


class PerImageConv:
    """Caffe's CPU convolution: one image at a time, im2col + GEMM per group."""

    def __init__(self, weight, bias, kernel, stride, pad, group, image_shape):
        self.w, self.b = weight, bias
        self.kernel, self.stride, self.pad, self.group = (kernel, kernel), (stride, stride), (pad, pad), group
        # Caffe's col_buffer_: one image's columns, allocated once.
        channels, spatial = image_shape[0], image_shape[1:]
        out_spatial = conv_output_shape(spatial, self.kernel, self.pad, self.stride)
        self.cols = np.empty((channels,) + self.kernel + out_spatial, dtype=weight.dtype)
        self.padded = np.zeros((channels,) + tuple(s + 2 * pad for s in spatial), dtype=weight.dtype)

    def _columns(self, image):
        # (C, H, W) -> (C, kh, kw, Ho, Wo), i.e. Caffe's (C*kh*kw, Ho*Wo) col buffer
        return im2col(image, self.kernel, self.pad, self.stride, 1, axis=1, out=self.cols,
                      workspace=self.padded if any(self.pad) else None)

    def forward(self, x, y):
        g = self.group
        w_g = self.w.reshape(g, self.w.shape[0] // g, -1)
        for n in range(x.shape[0]):
            cols = self._columns(x[n]).reshape(g, w_g.shape[2], -1)
            out = y[n].reshape(g, w_g.shape[1], -1)
            for k in range(g):
                np.dot(w_g[k], cols[k], out=out[k])
            y[n] += self.b[:, None, None]

    def backward(self, x, dy, dx, dw, db):
        g = self.group
        w_g = self.w.reshape(g, self.w.shape[0] // g, -1)
        dw_g = dw.reshape(w_g.shape)
        for n in range(x.shape[0]):
            db += dy[n].sum(axis=(1, 2))
            cols = self._columns(x[n])
            cols_g = cols.reshape(g, w_g.shape[2], -1)
            dy_g = dy[n].reshape(g, w_g.shape[1], -1)
            for k in range(g):
                dw_g[k] += dy_g[k] @ cols_g[k].T
            for k in range(g):
                np.dot(w_g[k].T, dy_g[k], out=cols_g[k])
            col2im(cols, x[n].shape, self.kernel, self.pad, self.stride, 1, axis=1, out=dx[n])


def make_layer(x_shape, num_output, kernel, stride, pad, group, layout):
    param = caffe_pb2.LayerParameter(name="conv", type="Convolution")
    cp = param.convolution_param
    cp.num_output, cp.group = num_output, group
    cp.kernel_size.append(kernel)
    cp.stride.append(stride)
    cp.pad.append(pad)
    cp.weight_filler.type = "gaussian"
    cp.weight_filler.std = 0.01
    cp.bias_filler.type = "constant"
    cp.bias_filler.value = 0.1
    layer = create_layer(param)
    bottom, top = [Blob(x_shape)], [Blob()]
    bottom[0].data[...] = np.random.default_rng(0).standard_normal(x_shape, dtype=np.float32)
    layer.setup(bottom, top)
    if layout != "auto":
        layer.gemm.layout = layout
        layer.reshape(bottom, top)
    top[0].diff[...] = np.random.default_rng(1).standard_normal(top[0].shape, dtype=np.float32)
    return layer, bottom, top


def timed(fn):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def bench(name, spec, rounds, layout):
    x_shape, num_output, kernel, stride, pad, group = spec
    layer, bottom, top = make_layer(x_shape, num_output, kernel, stride, pad, group, layout)
    weight, bias = layer.blobs
    ref = PerImageConv(weight.data, bias.data, kernel, stride, pad, group, x_shape[1:])
    x, dy = bottom[0].data, top[0].diff
    y_ref = np.empty_like(top[0].data)
    dx_ref = np.empty_like(x)
    dw_ref, db_ref = np.zeros_like(weight.diff), np.zeros_like(bias.diff)

    def batched_forward():
        layer.forward(bottom, top)

    def batched_backward():
        layer.backward(top, [True], bottom)

    def per_image_forward():
        ref.forward(x, y_ref)

    def per_image_backward():
        ref.backward(x, dy, dx_ref, dw_ref, db_ref)

    # Warm up, and check that both compute the same thing.
    weight.diff[...] = 0
    bias.diff[...] = 0
    batched_forward(), batched_backward(), per_image_forward(), per_image_backward()
    for got, want, what in ((top[0].data, y_ref, "top"), (bottom[0].diff, dx_ref, "bottom diff"),
                            (weight.diff, dw_ref, "weight diff"), (bias.diff, db_ref, "bias diff")):
        scale = max(1.0, float(np.abs(want).max()))
        if not np.allclose(got, want, rtol=1e-3, atol=1e-3 * scale):
            raise SystemExit(f"{name}: batched and per-image {what} disagree")

    # Rounds alternate which side goes first; each round's ratio compares two runs made
    # back to back, so a burst of other load on the machine hits both of them.
    times = {"bf": [], "pf": [], "bb": [], "pb": []}
    for r in range(rounds):
        order = (("bf", batched_forward), ("pf", per_image_forward),
                 ("bb", batched_backward), ("pb", per_image_backward))
        if r % 2:
            order = (order[1], order[0], order[3], order[2])
        for key, fn in order:
            times[key].append(timed(fn))
    t = {k: float(np.median(v)) for k, v in times.items()}
    t["fwd_speedup"] = float(np.median(np.divide(times["pf"], times["bf"])))
    t["bwd_speedup"] = float(np.median(np.divide(times["pb"], times["bb"])))
    out_shape = (x_shape[0], num_output) + conv_output_shape(x_shape[2:], (kernel,) * 2, pad, stride)
    geometry = f"{x_shape}->{out_shape} k{kernel} s{stride} p{pad} g{group}"
    layout_used = "1x1" if layer.gemm.is_1x1 else "batch_inner" if layer.gemm.batch_inner else "batch_outer"
    return name, geometry, layout_used, t


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds (medians are reported)")
    parser.add_argument("--only", default="", help="run only shapes whose name contains this text")
    parser.add_argument("--layout", default="auto", choices=("auto", "batch_outer", "batch_inner"),
                        help="force the batched layer's column layout (default: its own choice)")
    args = parser.parse_args(argv)

    cmd = "python benchmarks/conv_bench.py" + "".join(f" {a}" for a in (argv if argv is not None
                                                                          else sys.argv[1:]))
    print(f"# {cmd}")
    print(f"# numpy {np.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs, float32; "
          f"median of {args.rounds} rounds in ms; speedup = median of per-round per-image/batched")
    header = (f"| {'layer':15s} | {'geometry':52s} | {'layout':11s} | {'fwd batched':>11s} | "
              f"{'fwd per-img':>11s} | {'speedup':>7s} | {'bwd batched':>11s} | {'bwd per-img':>11s} | "
              f"{'speedup':>7s} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, spec in SHAPES.items():
        if args.only not in name:
            continue
        name, geometry, layout, t = bench(name, spec, args.rounds, args.layout)
        print(f"| {name:15s} | {geometry:52s} | {layout:11s} | {t['bf']:11.2f} | {t['pf']:11.2f} | "
              f"{t['fwd_speedup']:6.2f}x | {t['bb']:11.2f} | {t['pb']:11.2f} | {t['bwd_speedup']:6.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
