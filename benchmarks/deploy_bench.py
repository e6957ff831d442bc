"""Deploy-net forward time and peak memory: minicaffe against OpenCV dnn (and Caffe, given a path).

Every net gets random well-scaled weights (He-normal weights, small biases, unit BatchNorm
statistics), saved once as a .caffemodel that every engine loads. Each engine runs in its own
process, so peak RSS is that engine's alone; rounds alternate between engines and the table shows
medians. ratio = minicaffe / OpenCV (below 1 means minicaffe is faster). minicaffe runs as an
inference user would, with `Net(..., inference=True)`; `--plain` adds the default Net's column and
`--numpy` a column of the same inference net with compiled kernels off (MINICAFFE_JIT=0), which
shows what the numba kernels of `minicaffe[fast]` gain.

    python benchmarks/deploy_bench.py                       # the six nets of ../shared/models/bench
    python benchmarks/deploy_bench.py --nets squeezenet --rounds 5 --threads 2
    python benchmarks/deploy_bench.py --nets mobilenet --numpy     # compiled kernels on vs off
    python benchmarks/deploy_bench.py --nets resnet152 --rounds 1   # ResNet-152 b10, built in code
    python benchmarks/deploy_bench.py --caffe /path/to/caffe   # adds a Caffe column (`caffe time`)
    python benchmarks/deploy_bench.py --pycaffe /path/to/caffe/python

OpenCV dnn is `pip install "opencv-python-headless<4.11"` (the `reference` extra); without it its
column is skipped with a message. It is a benchmark-only reference, never a minicaffe dependency.
"""
import argparse
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

from _bench_common import SHARED, child_env, child_rss_mb, print_command, print_table

BENCH = SHARED / "models" / "bench"
# (name, prototxt, batch): the batch sizes of the inference issue's table
NETS = [
    ("caffenet", "caffenet_deploy.prototxt", 10),
    ("googlenet", "googlenet_deploy.prototxt", 1),
    ("resnet50", "resnet50_deploy.prototxt", 1),
    ("squeezenet", "squeezenet_v1.1_deploy.prototxt", 1),
    ("mobilenet", "mobilenet_v1_deploy.prototxt", 1),
    ("vgg16", "vgg16_deploy.prototxt", 1),
]
# Nets built in code (no prototxt in ../shared), run only when named in --nets: ResNet-152 at
# batch 10 is the memory target and takes a minute per engine and round.
BUILT = {"resnet152": ((3, 8, 36, 3), "ResNet-152", 10)}
MINICAFFE_ENGINES = ("minicaffe", "minicaffe-plain", "minicaffe-numpy")
CAFFE_FORWARD = re.compile(r"Average Forward pass: ([\d.]+) ms")


def resnet_deploy(blocks, name, batch=1):
    """The NetParameter of an MSRA bottleneck ResNet deploy net with `blocks` blocks in stages 2..5.

    Layer for layer what ../shared/models/bench/resnet50_deploy.prototxt is for blocks (3, 4, 6, 3):
    conv1 7x7/2 + BatchNorm + Scale + ReLU, max pool 3x3/2, then per stage s bottleneck blocks
    1x1 (w) -> 3x3 (w) -> 1x1 (4w), w = 64 * 2**(s-2), each conv bias-free and followed by an
    in-place BatchNorm (global stats) + Scale (with bias); the first block of a stage has a 1x1
    projection branch (stride 2 from stage 3 on, on it and on the first 1x1), the others add
    their input. Blocks are named a, b, c, ... and, in stages of more than 6 blocks, a, b1, b2, ...
    as in MSRA's ResNet-101/152. Then 7x7 average pool, fc1000 and Softmax.
    """
    from minicaffe.proto import caffe_pb2

    if len(blocks) != 4 or min(blocks) < 1:
        raise ValueError(f"resnet_deploy: blocks must be 4 positive stage lengths, got {blocks!r}")
    net = caffe_pb2.NetParameter(name=name)

    def layer(kind, layer_name, bottoms, top, **params):
        new = net.layer.add(name=layer_name, type=kind, bottom=bottoms, top=[top])
        for field, values in params.items():
            getattr(new, field).MergeFrom(values)
        return top

    def conv_bn(bottom, top, tag, width, kernel, stride, relu, bias=False):
        conv = caffe_pb2.ConvolutionParameter(num_output=width, pad=[kernel // 2], kernel_size=[kernel],
                                              stride=[stride])
        if not bias:
            conv.bias_term = False
        layer("Convolution", top, [bottom], top, convolution_param=conv)
        layer("BatchNorm", f"bn{tag}", [top], top,
              batch_norm_param=caffe_pb2.BatchNormParameter(use_global_stats=True))
        layer("Scale", f"scale{tag}", [top], top, scale_param=caffe_pb2.ScaleParameter(bias_term=True))
        if relu:
            layer("ReLU", f"{top}_relu", [top], top)
        return top

    layer("Input", "input", [], "data", input_param=caffe_pb2.InputParameter(
        shape=[caffe_pb2.BlobShape(dim=[batch, 3, 224, 224])]))
    x = conv_bn("data", "conv1", "_conv1", 64, 7, 2, relu=True, bias=True)
    x = layer("Pooling", "pool1", [x], "pool1", pooling_param=caffe_pb2.PoolingParameter(
        pool=caffe_pb2.PoolingParameter.MAX, kernel_size=3, stride=2))
    for stage, count in enumerate(blocks, start=2):
        width = 64 * 2 ** (stage - 2)
        for i in range(count):
            block = f"{stage}{'abcdef'[i]}" if count <= 6 else f"{stage}{'a' if i == 0 else f'b{i}'}"
            stride = 2 if i == 0 and stage > 2 else 1
            shortcut = x
            if i == 0:
                shortcut = conv_bn(x, f"res{block}_branch1", f"{block}_branch1", 4 * width, 1, stride, relu=False)
            y = conv_bn(x, f"res{block}_branch2a", f"{block}_branch2a", width, 1, stride, relu=True)
            y = conv_bn(y, f"res{block}_branch2b", f"{block}_branch2b", width, 3, 1, relu=True)
            y = conv_bn(y, f"res{block}_branch2c", f"{block}_branch2c", 4 * width, 1, 1, relu=False)
            x = layer("Eltwise", f"res{block}", [shortcut, y], f"res{block}")
            layer("ReLU", f"res{block}_relu", [x], x)
    x = layer("Pooling", "pool5", [x], "pool5", pooling_param=caffe_pb2.PoolingParameter(
        pool=caffe_pb2.PoolingParameter.AVE, kernel_size=7, stride=1))
    x = layer("InnerProduct", "fc1000", [x], "fc1000",
              inner_product_param=caffe_pb2.InnerProductParameter(num_output=1000))
    layer("Softmax", "prob", [x], "prob")
    return net


def write_built_net(name, out_dir):
    """Write the prototxt of the BUILT net `name` into out_dir; returns (its path, its batch)."""
    from google.protobuf import text_format

    blocks, title, batch = BUILT[name]
    path = pathlib.Path(out_dir) / f"{name}_deploy.prototxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_format.MessageToString(resnet_deploy(blocks, title, batch)))
    return path, batch


def make_weights(prototxt, batch, out_dir):
    """A deploy prototxt with its batch set, plus a .caffemodel of well-scaled random weights."""
    import numpy as np
    import minicaffe

    from google.protobuf import text_format
    from minicaffe.proto_io import read_net_param

    param = read_net_param(str(prototxt))  # net-level input_dim / input_shape become an Input layer
    for layer in param.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = batch
    prototxt = out_dir / prototxt.name
    prototxt.write_text(text_format.MessageToString(param))
    rng = np.random.default_rng(0)
    net = minicaffe.Net(str(prototxt), minicaffe.TEST)
    for layer_name, blobs in net.params.items():
        kind = net.layer_dict[layer_name].type
        for i, blob in enumerate(blobs):
            shape = blob.data.shape
            if kind == "BatchNorm":  # blobs: mean, variance, moving-average factor
                blob.data[...] = rng.normal(0, 0.1, shape) if i == 0 else 1.0
            elif kind == "Scale":
                blob.data[...] = rng.normal(1.0 if i == 0 else 0.0, 0.1, shape)
            elif i == 0 and blob.data.ndim >= 2:
                fan_in = int(np.prod(shape[1:]))
                blob.data[...] = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
            else:
                blob.data[...] = rng.normal(0, 0.01, shape)
    weights = out_dir / (prototxt.stem + ".caffemodel")
    net.save(str(weights))
    shape = net.blobs[net.inputs[0]].data.shape
    np.save(out_dir / (prototxt.stem + ".input.npy"), rng.standard_normal(shape, dtype=np.float32))
    # engines are compared on the scores before a final Softmax: random weights saturate it
    blob = net.bottom_ids[-1][0] if net.layers[-1].type == "Softmax" else net.outputs[-1]
    producer = [n for n, tops in zip(net.layer_names, net.top_ids) if blob in tops][-1]
    return {"prototxt": str(prototxt), "weights": str(weights), "inputs": str(out_dir / (prototxt.stem + ".input.npy")),
            "blob": blob, "layer": producer}


def worker(engine, spec, iterations, threads, out_npy):
    """Runs inside the child process: load, warm up, time `iterations` forwards, print JSON."""
    if engine in MINICAFFE_ENGINES:
        import minicaffe   # before numpy, as a user's script would: it sets numpy's BLAS defaults
    import numpy as np
    prototxt, weights, x = spec["prototxt"], spec["weights"], np.load(spec["inputs"])
    if engine in MINICAFFE_ENGINES:
        lean = engine != "minicaffe-plain"
        net = minicaffe.Net(prototxt, minicaffe.TEST, weights=weights, inference=lean,
                            keep_blobs=[spec["blob"]] if lean else ())
        name = net.inputs[0]

        def forward():
            net.blobs[name].data[...] = x
            net.forward()
            return net.blobs[spec["blob"]].data
    elif engine == "pycaffe":
        import caffe
        caffe.set_mode_cpu()
        net = caffe.Net(prototxt, weights, caffe.TEST)
        name = net.inputs[0]

        def forward():
            net.blobs[name].data[...] = x
            net.forward()
            return net.blobs[spec["blob"]].data
    else:
        import cv2
        cv2.setNumThreads(threads)
        net = cv2.dnn.readNetFromCaffe(prototxt, weights)
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

        def forward():
            net.setInput(x)
            return net.forward(spec["layer"])
    out = forward()  # warm-up: first-call allocations and lazy initialisation
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        out = forward()
        times.append((time.perf_counter() - start) * 1000)
    np.save(out_npy, np.asarray(out, dtype=np.float32))
    print(json.dumps({"ms": statistics.median(times)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=",".join(n for n, _, _ in NETS),
                        help="comma-separated subset of: " + ", ".join(n for n, _, _ in NETS)
                             + "; also " + ", ".join(BUILT) + " (built in code, not run by default)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds per engine (medians)")
    parser.add_argument("--iterations", type=int, default=10, help="timed forwards per round")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())),
                        help="BLAS / OpenCV threads for every engine")
    parser.add_argument("--caffe", help="a Caffe binary: adds a column timed with `caffe time`")
    parser.add_argument("--pycaffe", help="a folder holding pycaffe's `caffe` package: adds a column")
    parser.add_argument("--plain", action="store_true",
                        help="add a column for the default Net, which keeps every blob (minicaffe's "
                             "column is Net(..., inference=True))")
    parser.add_argument("--numpy", action="store_true",
                        help="add a column for the inference net with compiled kernels off (MINICAFFE_JIT=0)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # engine, spec JSON, output .npy
    parser.add_argument("--prepare", nargs=3, help=argparse.SUPPRESS)  # prototxt, batch, folder
    args = parser.parse_args()
    if args.prepare:
        prototxt, batch, folder = args.prepare
        return print(json.dumps(make_weights(pathlib.Path(prototxt), int(batch), pathlib.Path(folder))))
    if args.worker:
        engine, spec, out_npy = args.worker
        return worker(engine, json.loads(spec), args.iterations, args.threads, out_npy)

    import numpy as np
    known = {n: (BENCH / f, b) for n, f, b in NETS}
    chosen = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known and n not in BUILT]
    if unknown:
        parser.error(f"unknown net(s) {', '.join(unknown)}; choose from {', '.join([*known, *BUILT])}")
    if args.rounds < 1 or args.iterations < 1 or args.threads < 1:
        parser.error("--rounds, --iterations and --threads must be at least 1")
    engines = (["minicaffe"] + (["minicaffe-plain"] if args.plain else [])
               + (["minicaffe-numpy"] if args.numpy else []))
    try:
        import cv2  # noqa: F401
        engines.append("opencv")
    except ImportError:
        print('OpenCV dnn column skipped: pip install "opencv-python-headless<4.11"', file=sys.stderr)
    if args.pycaffe:
        engines.append("pycaffe")
    if args.caffe:
        engines.append("caffe")
    env = child_env(args.threads, [args.pycaffe] if args.pycaffe else [])

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for name in chosen:
            prototxt, batch = known[name] if name in known else write_built_net(name, tmp / "built")
            # in a child, so that this process stays small: a child's peak RSS starts at its parent's
            prepared, _ = child_rss_mb([sys.executable, __file__, "--prepare", str(prototxt), str(batch), str(tmp)], env)
            spec = json.loads(prepared.strip().splitlines()[-1])
            ms = {e: [] for e in engines}
            rss = {e: [] for e in engines}
            for _ in range(args.rounds):
                for engine in engines:
                    out_npy = tmp / f"{name}.{engine}.npy"
                    if engine == "caffe":
                        cmd = [args.caffe, "time", "-model", spec["prototxt"], "-weights", spec["weights"],
                               "-phase", "TEST", "-iterations", str(args.iterations)]
                        text, peak = child_rss_mb(cmd, env)
                        found = CAFFE_FORWARD.search(text)
                        if not found:
                            raise RuntimeError(f"no 'Average Forward pass' line from {args.caffe}")
                        ms[engine].append(float(found.group(1)))
                    else:
                        cmd = [sys.executable, __file__, "--worker", engine, json.dumps(spec), str(out_npy),
                               "--iterations", str(args.iterations), "--threads", str(args.threads)]
                        text, peak = child_rss_mb(cmd, dict(env, MINICAFFE_JIT="0") if engine == "minicaffe-numpy" else env)
                        ms[engine].append(json.loads(text.strip().splitlines()[-1])["ms"])
                    rss[engine].append(peak)
            row = {"net": name, "batch": batch}
            for engine in engines:
                row[engine] = (statistics.median(ms[engine]), max(rss[engine]))
            if "opencv" in engines:
                a, b = np.load(tmp / f"{name}.minicaffe.npy"), np.load(tmp / f"{name}.opencv.npy")
                row["max_rel_err"] = float(np.abs(a - b.reshape(a.shape)).max() / max(np.abs(b).max(), 1e-12))
            rows.append(row)
            print(f"{name}: " + "  ".join(f"{e} {row[e][0]:.1f} ms" for e in engines), file=sys.stderr, flush=True)

    print_command(__file__, env)
    print(f"forward ms (median of {args.rounds} alternated rounds x {args.iterations} forwards), "
          f"peak RSS MB, {args.threads} threads")
    header = ["net", "batch"] + [f"{e} {unit}" for e in engines for unit in ("ms", "MB")]
    # minicaffe against each reference engine that ran (pycaffe's engine is Caffe's too)
    references = [(e, label) for e, label in (("opencv", "OpenCV"), ("caffe", "Caffe"), ("pycaffe", "pycaffe"))
                  if e in engines]
    header += [f"minicaffe / {label}" for _, label in references]
    if "opencv" in engines:
        header += ["max rel. diff"]
    table = []
    for row in rows:
        cells = [row["net"], str(row["batch"])]
        for engine in engines:
            cells += [f"{row[engine][0]:.1f}", f"{row[engine][1]:.0f}"]
        cells += [f"{row['minicaffe'][0] / row[e][0]:.2f}" for e, _ in references]
        if "opencv" in engines:
            cells += [f"{row['max_rel_err']:.1e}"]
        table.append(cells)
    print_table(header, table)


if __name__ == "__main__":
    main()
