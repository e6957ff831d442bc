"""Training-step time and peak memory: minicaffe against the same nets in PyTorch (and Caffe, given a path).

One step is forward, backward and an SGD update (base_lr 0.01 fixed, momentum 0.9, weight_decay
5e-4, Caffe's lr_mult/decay_mult) through minicaffe's Solver (`solver.step(1)`) and through
torch.optim.SGD. The training net is the deploy prototxt with its batch set, its final Softmax
replaced by SoftmaxWithLoss on a `label` Input, BatchNorm in TRAIN mode (batch statistics, as
PyTorch's train mode) and, where the deploy net gives no filler, msra (the classifier: gaussian
std 0.01, as BVLC's train_val). Both engines start from the same weights (drawn once by
minicaffe's fillers, seed 0) and see the same batches: real MNIST
(pixels x 1/256, real labels) for LeNet, one fixed random batch for the ImageNet nets, fed
through the Input blobs. Each engine runs in its own process (peak RSS is that engine's alone),
the engine order alternates between rounds and the table shows medians.
ratio = minicaffe / PyTorch (below 1 means minicaffe is faster).

    python benchmarks/train_bench.py                        # lenet, caffenet, resnet50
    python benchmarks/train_bench.py --quick                # smoke run: 1 round, 2 steps
    python benchmarks/train_bench.py --nets lenet --rounds 5 --threads 2 --layers
    python benchmarks/train_bench.py --caffe /path/to/caffe  # adds a Caffe column (`caffe train` steps)
    python benchmarks/train_bench.py --nets lenet --numpy    # adds minicaffe with compiled kernels off

PyTorch is `pip install torch==2.13.0` (the CPU build); without it its column is skipped with a
message. It is a benchmark-only reference, never a minicaffe dependency: torch is imported only
in the PyTorch worker process.
"""
import argparse
import functools
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

from _bench_common import (ROOT, SHARED, alternated, child_env, child_rss_mb, iteration_stamps, print_command,
                           print_table)

BENCH = SHARED / "models" / "bench"
# (name, deploy prototxt, batch, timed steps per round by default)
NETS = [
    ("lenet", ROOT / "models" / "lenet" / "lenet.prototxt", 64, 50),
    ("caffenet", BENCH / "caffenet_deploy.prototxt", 32, 10),
    ("resnet50", BENCH / "resnet50_deploy.prototxt", 8, 10),
]
SCALING_BATCHES = (16, 64, 256)   # LeNet: does the cost per image fall as the batch grows?
MNIST_BATCHES = 4                 # distinct real batches cycled through (the ImageNet nets use one)
ENGINES = ("minicaffe", "torch")
SOLVER = dict(base_lr=0.01, momentum=0.9, weight_decay=5e-4)
TORCH_MISSING = "PyTorch column skipped: pip install torch==2.13.0"


# -- the training net and its data (run in a child: see prepare) ----------------------------------
def train_net_param(deploy, batch):
    """The NetParameter that trains `deploy` at `batch`: SoftmaxWithLoss on a `label` Input."""
    from minicaffe.proto import caffe_pb2
    from minicaffe.proto_io import read_net_param

    param = read_net_param(str(deploy))  # net-level input_dim / input_shape become an Input layer
    layers = list(param.layer)
    if layers[-1].type != "Softmax" or layers[0].type != "Input":
        raise ValueError(f"{deploy}: expected an Input first and a Softmax last")
    for layer in layers:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = batch
        elif layer.type == "BatchNorm":
            layer.batch_norm_param.use_global_stats = False
        elif layer.type in ("Convolution", "InnerProduct"):
            p = layer.convolution_param if layer.type == "Convolution" else layer.inner_product_param
            if not p.HasField("weight_filler"):  # Caffe's default filler is constant 0
                if layer.top[0] == layers[-1].bottom[0]:
                    # the classifier as in BVLC's train_val: small scores, a first loss near ln(classes)
                    p.weight_filler.type, p.weight_filler.std = "gaussian", 0.01
                else:
                    p.weight_filler.type = "msra"
    label = caffe_pb2.LayerParameter(name="label", type="Input", top=["label"])
    label.input_param.shape.add().dim.append(batch)
    loss = caffe_pb2.LayerParameter(name="loss", type="SoftmaxWithLoss", bottom=[layers[-1].bottom[0], "label"],
                                    top=["loss"])
    del param.layer[:]
    param.layer.extend([layers[0], label] + layers[1:-1] + [loss])
    return param


@functools.lru_cache(maxsize=None)
def mnist_train(mnist_dir):
    """The MNIST training (images, labels) as uint8 arrays, read once per process."""
    from minicaffe.datasets.mnist import IMAGE_MAGIC, LABEL_MAGIC, find_local, read_idx
    files = find_local(str(mnist_dir))
    need = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    if not all(f in files for f in need):
        raise SystemExit(f"no MNIST training files in {mnist_dir} (give --mnist DIR)")
    return read_idx(files[need[0]], IMAGE_MAGIC), read_idx(files[need[1]], LABEL_MAGIC)


def batches(name, shape, mnist_dir):
    """(data, labels) stacked as (n, batch, ...) float32: real MNIST for LeNet, else one random batch."""
    import numpy as np

    if name == "lenet":
        n = MNIST_BATCHES * shape[0]
        images, labels = mnist_train(str(mnist_dir))
        images = images[:n].astype(np.float32) * np.float32(0.00390625)   # lenet_train_test's scale
        return images.reshape((MNIST_BATCHES,) + shape), labels[:n].astype(np.float32).reshape(MNIST_BATCHES, -1)
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1,) + shape, dtype=np.float32),
            rng.integers(0, 1000, (1, shape[0])).astype(np.float32))


def prepare(name, batch, folder, mnist_dir):
    """Writes the training prototxt, its initial weights (.npz) and its batches; returns their paths."""
    import numpy as np
    from google.protobuf import text_format
    import minicaffe

    deploy = {n: path for n, path, _, _ in NETS}[name]
    param = train_net_param(deploy, batch)
    stem = folder / f"{name}_b{batch}"
    prototxt = f"{stem}.prototxt"
    with open(prototxt, "w") as f:
        f.write(text_format.MessageToString(param))
    minicaffe.set_random_seed(0)
    net = minicaffe.Net(prototxt, minicaffe.TRAIN)
    # BatchNorm's running statistics are not trained (and not in PyTorch's parameters): every
    # engine starts them at Caffe's zeros.
    np.savez(f"{stem}.npz", **{f"{layer}/{i}": blob.data for layer, blobs in net.params.items()
                               if net.layer_dict[layer].type != "BatchNorm" for i, blob in enumerate(blobs)})
    data, labels = batches(name, net.blobs["data"].data.shape, mnist_dir)
    np.save(f"{stem}.data.npy", data)
    np.save(f"{stem}.label.npy", labels)
    mults = {lp.name: [[p.lr_mult, p.decay_mult] for p in lp.param] for lp in param.layer if len(lp.param)}
    return {"net": name, "batch": batch, "prototxt": prototxt, "npz": f"{stem}.npz",
            "data": f"{stem}.data.npy", "label": f"{stem}.label.npy", "mults": mults}


def load_weights(net, npz):
    """Copies prepare's weights into a minicaffe net's params, in place (the solver holds these blobs)."""
    import numpy as np

    weights = np.load(npz)
    for key in weights.files:
        layer, i = key.split("/")
        net.params[layer][int(i)].data[...] = weights[key]


# -- the two trainers: each returns step(i) -> the loss of that step's forward -------------------
def minicaffe_trainer(spec):
    """minicaffe's SGDSolver on the training net, starting from the spec's weights."""
    import minicaffe   # before numpy, as a user's script would: it sets numpy's BLAS defaults
    import numpy as np
    from minicaffe.proto import caffe_pb2
    from minicaffe.proto_io import read_net_param

    solver_param = caffe_pb2.SolverParameter(type="SGD", lr_policy="fixed", max_iter=10 ** 9, display=0, **SOLVER)
    solver_param.net_param.CopyFrom(read_net_param(spec["prototxt"]))
    solver = minicaffe.SGDSolver(solver_param)
    load_weights(solver.net, spec["npz"])
    data, label = solver.net.blobs["data"].data, solver.net.blobs["label"].data
    xs, ys = np.load(spec["data"]), np.load(spec["label"])

    def step(i):
        data[...] = xs[i % len(xs)]
        label[...] = ys[i % len(ys)]
        solver.step(1)
        return solver.smoothed_loss   # average_loss 1: this step's loss
    step.solver = solver   # for benchmarks that switch code paths between steps (wgrad_bench.py)
    return step


def torch_net(name):
    """(model, blobs): the PyTorch twin of a net and {Caffe layer name: its tensors in Caffe's blob order}.

    Shapes follow the prototxts: Caffe pools in ceil mode, CaffeNet's LRN is across 5 channels
    (torch's LocalResponseNorm divides alpha by the size as Caffe does), ResNet-50 strides in the
    first 1x1 conv of each downsampling block, and BatchNorm + Scale is one affine BatchNorm2d.
    """
    from torch import nn

    blobs = {}

    def conv(layer, cin, cout, k, stride=1, pad=0, group=1, bias=True):
        m = nn.Conv2d(cin, cout, k, stride, pad, groups=group, bias=bias)
        blobs[layer] = [m.weight] + ([m.bias] if bias else [])
        return m

    def fc(layer, cin, cout):
        m = nn.Linear(cin, cout)
        blobs[layer] = [m.weight, m.bias]
        return m

    def bn(scale_layer, c):  # Caffe's moving_average_fraction 0.999 is torch's momentum 0.001
        m = nn.BatchNorm2d(c, eps=1e-5, momentum=0.001)
        blobs[scale_layer] = [m.weight, m.bias]
        return m

    def relu():
        return nn.ReLU(inplace=True)

    def pool(k, s):
        return nn.MaxPool2d(k, s, ceil_mode=True)

    if name == "lenet":
        model = nn.Sequential(conv("conv1", 1, 20, 5), pool(2, 2), conv("conv2", 20, 50, 5), pool(2, 2),
                              nn.Flatten(), fc("ip1", 800, 500), relu(), fc("ip2", 500, 10))
    elif name == "caffenet":
        def lrn():
            return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
        model = nn.Sequential(
            conv("conv1", 3, 96, 11, 4), relu(), pool(3, 2), lrn(),
            conv("conv2", 96, 256, 5, pad=2, group=2), relu(), pool(3, 2), lrn(),
            conv("conv3", 256, 384, 3, pad=1), relu(),
            conv("conv4", 384, 384, 3, pad=1, group=2), relu(),
            conv("conv5", 384, 256, 3, pad=1, group=2), relu(), pool(3, 2), nn.Flatten(),
            fc("fc6", 9216, 4096), relu(), nn.Dropout(0.5),
            fc("fc7", 4096, 4096), relu(), nn.Dropout(0.5), fc("fc8", 4096, 1000))
    elif name == "resnet50":
        class Bottleneck(nn.Module):
            """res{b}: 1x1 (stride) -> 3x3 -> 1x1 x4 channels, plus the input or its 1x1 projection."""

            def __init__(self, b, cin, mid, stride):
                super().__init__()
                self.branch2 = nn.Sequential(
                    conv(f"res{b}_branch2a", cin, mid, 1, stride, bias=False), bn(f"scale{b}_branch2a", mid), relu(),
                    conv(f"res{b}_branch2b", mid, mid, 3, pad=1, bias=False), bn(f"scale{b}_branch2b", mid), relu(),
                    conv(f"res{b}_branch2c", mid, 4 * mid, 1, bias=False), bn(f"scale{b}_branch2c", 4 * mid))
                self.branch1 = None if cin == 4 * mid else nn.Sequential(
                    conv(f"res{b}_branch1", cin, 4 * mid, 1, stride, bias=False), bn(f"scale{b}_branch1", 4 * mid))

            def forward(self, x):
                out = self.branch2(x)
                out += x if self.branch1 is None else self.branch1(x)
                return out.relu_()

        stages, cin = [], 64
        for stage, (mid, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=2):
            for j in range(blocks):
                stages.append(Bottleneck(f"{stage}{'abcdef'[j]}", cin, mid, 2 if j == 0 and stage > 2 else 1))
                cin = 4 * mid
        model = nn.Sequential(conv("conv1", 3, 64, 7, 2, 3), bn("scale_conv1", 64), relu(), pool(3, 2), *stages,
                              nn.AvgPool2d(7, 1, ceil_mode=True), nn.Flatten(), fc("fc1000", 2048, 1000))
    else:
        raise ValueError(f"no PyTorch twin for net {name!r}")
    return model, blobs


def torch_model(spec):
    """(model, blobs) of torch_net, loaded with the spec's weights (the prototxt's shapes, exactly)."""
    import numpy as np
    import torch

    model, blobs = torch_net(spec["net"])
    weights = np.load(spec["npz"])
    layers = {k.split("/")[0] for k in weights.files}
    if layers != set(blobs):
        raise RuntimeError(f"the PyTorch {spec['net']} differs from the prototxt in layers "
                           f"{sorted(layers ^ set(blobs))}")
    with torch.no_grad():
        for layer, tensors in blobs.items():
            for i, t in enumerate(tensors):
                w = weights[f"{layer}/{i}"]
                if w.shape != tuple(t.shape):
                    raise RuntimeError(f"{layer} blob {i}: the prototxt has {w.shape}, PyTorch {tuple(t.shape)}")
                t.copy_(torch.from_numpy(w))
    return model, blobs


def torch_trainer(spec, threads):
    """torch.optim.SGD on the loaded PyTorch twin, Caffe's lr_mult/decay_mult as param groups."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    model, blobs = torch_model(spec)
    groups = {}
    for layer, tensors in blobs.items():
        for i, t in enumerate(tensors):
            given = spec["mults"].get(layer, [])   # Caffe's multipliers default to 1
            lr_mult, decay_mult = given[i] if i < len(given) else (1, 1)
            groups.setdefault((lr_mult, decay_mult), []).append(t)
    optimizer = torch.optim.SGD(
        [{"params": ts, "lr": SOLVER["base_lr"] * lr, "weight_decay": SOLVER["weight_decay"] * decay}
         for (lr, decay), ts in groups.items()], lr=SOLVER["base_lr"], momentum=SOLVER["momentum"])
    model.train()
    xs = torch.from_numpy(np.load(spec["data"]))
    ys = torch.from_numpy(np.load(spec["label"])).long()

    def step(i):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xs[i % len(xs)]), ys[i % len(ys)])
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def worker(engine, spec, warmup, steps, threads):
    """Runs inside the child process: warm up, time `steps` training steps, print JSON."""
    step = minicaffe_trainer(spec) if engine.startswith("minicaffe") else torch_trainer(spec, threads)
    losses = [step(i) for i in range(warmup)]
    times = []
    for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        losses.append(step(i))
        times.append((time.perf_counter() - start) * 1000)
    print(json.dumps({"ms": statistics.median(times), "first_loss": losses[0], "last_loss": losses[-1]}))


def layer_worker(spec, iterations):
    """Runs inside a child: `minicaffe time`'s per-layer forward/backward split on the training net."""
    import minicaffe   # before numpy (minicaffe/_blas_env.py)
    import numpy as np
    from minicaffe.commands.time import time_layers

    net = minicaffe.Net(spec["prototxt"], minicaffe.TRAIN)
    load_weights(net, spec["npz"])
    net.blobs["data"].data[...] = np.load(spec["data"])[0]
    net.blobs["label"].data[...] = np.load(spec["label"])[0]
    net.forward_backward()  # untimed: buffers exist before timing starts
    forward, backward, total_forward, total_backward, _ = time_layers(net, iterations)
    # A fused BatchNorm -> Scale -> ReLU chain (fuse.py) is timed as one step, on its BatchNorm.
    kinds = {i: step.type for i, step, _, _ in net.fused_steps()[0]} if net._fusing() else {}
    layers = [(name, kinds.get(i, net.layers[i].type), f * 1000 / iterations, b * 1000 / iterations)
              for i, (name, f, b) in enumerate(zip(net.layer_names, forward, backward))]
    print(json.dumps({"layers": layers, "forward": total_forward * 1000 / iterations,
                      "backward": total_backward * 1000 / iterations}))


def write_caffe_solver(spec, iterations):
    """A solver prototxt beside spec's net: SOLVER's settings, a display line every iteration."""
    path = spec["prototxt"][:-len(".prototxt")] + f".solver{iterations}.prototxt"
    with open(path, "w") as f:
        f.write(f'net: "{spec["prototxt"]}"\nlr_policy: "fixed"\nmax_iter: {iterations}\ndisplay: 1\n'
                f'snapshot_after_train: false\nsolver_mode: CPU\n'
                + "".join(f"{key}: {value}\n" for key, value in SOLVER.items()))
    return path


def caffe_step_ms(text, warmup, steps, binary):
    """Median ms between Caffe's per-iteration display lines after `warmup` iterations. Each gap
    is one whole step: the previous iteration's update, then this one's forward and backward."""
    stamps = iteration_stamps(text)
    wanted = range(warmup, warmup + steps + 1)
    if any(i not in stamps for i in wanted):
        raise RuntimeError(f"{binary} train: no 'Iteration N (' line for every iteration:\n{text[-1500:]}")
    gaps = [(stamps[i + 1] - stamps[i]) % 86400 for i in wanted[:-1]]   # % 86400: past midnight
    return statistics.median(gaps) * 1000


# -- the parent: runs the children, prints the tables ----------------------------------------------
def torch_available():
    """Whether torch is installed, without importing it (the parent process stays torch-free)."""
    return importlib.util.find_spec("torch") is not None


def last_json(text):
    return json.loads(text.strip().splitlines()[-1])


class Runner:
    """Prepares each (net, batch) once and times engines on it in child processes."""

    def __init__(self, args, folder):
        self.args, self.folder, self.specs = args, folder, {}
        self.env = child_env(args.threads)
        # minicaffe's pool for memory-bound ops reads this; BLAS reads the variables above
        self.minicaffe_env = dict(self.env, MINICAFFE_THREADS=str(args.threads))

    def prepare(self, pairs):
        """Writes the nets and data of every (net, batch) in one child: this process stays small
        (a child's peak RSS starts at its parent's) and MNIST is read once."""
        todo = [f"{n}:{b}" for n, b in dict.fromkeys(pairs) if (n, b) not in self.specs]
        if todo:
            text, _ = child_rss_mb([sys.executable, __file__, "--prepare", str(self.folder), *todo,
                                    "--mnist", str(self.args.mnist)], self.env)
            self.specs.update({(s["net"], s["batch"]): s for s in last_json(text)})

    def spec(self, name, batch):
        self.prepare([(name, batch)])
        return self.specs[name, batch]

    def run(self, engine, spec, steps):
        """(ms per step, peak RSS MB, first loss or None) of one round."""
        a = self.args
        if engine == "caffe":
            solver = write_caffe_solver(spec, a.warmup + steps + 1)
            text, peak = child_rss_mb([a.caffe, "train", "-solver", solver], self.env)
            return caffe_step_ms(text, a.warmup, steps, a.caffe), peak, None
        cmd = [sys.executable, __file__, "--worker", engine, json.dumps(spec), "--steps", str(steps),
               "--warmup", str(a.warmup), "--threads", str(a.threads)]
        env = {"minicaffe": self.minicaffe_env, "minicaffe-numpy": dict(self.minicaffe_env, MINICAFFE_JIT="0")}
        text, peak = child_rss_mb(cmd, env.get(engine, self.env))
        result = last_json(text)
        return result["ms"], peak, result["first_loss"]

    def measure(self, name, batch, engines, steps):
        """{engine: (median ms per step, max peak RSS MB, first loss)} over alternated rounds."""
        spec = self.spec(name, batch)
        runs = {e: [] for e in engines}
        for _, engine in alternated(self.args.rounds, engines):
            runs[engine].append(self.run(engine, spec, steps))
        result = {e: (statistics.median(r[0] for r in rs), max(r[1] for r in rs), rs[0][2]) for e, rs in runs.items()}
        print(f"{name} batch {batch}: " + "  ".join(f"{e} {result[e][0]:.1f} ms" for e in engines),
              file=sys.stderr, flush=True)
        return result

    def layers(self, name, batch, iterations):
        text, _ = child_rss_mb([sys.executable, __file__, "--layer-worker", json.dumps(self.spec(name, batch)),
                                "--steps", str(iterations)], self.minicaffe_env)
        return last_json(text)


LABELS = {"minicaffe": "minicaffe", "torch": "PyTorch", "caffe": "Caffe",
          "minicaffe-numpy": "minicaffe without compiled kernels"}


def net_table(rows, engines):
    header = ["net", "batch"]
    for e in engines:
        header += [f"{LABELS[e]} ms/step", f"{LABELS[e]} img/s", f"{LABELS[e]} MB"]
    header += [f"minicaffe / {LABELS[e]}" for e in engines if e != "minicaffe" and "minicaffe" in engines]
    if {"minicaffe", "torch"} <= set(engines):
        header.append("first loss minicaffe / PyTorch")
    table = []
    for name, batch, result in rows:
        cells = [name, str(batch)]
        for e in engines:
            ms, mb, _ = result[e]
            cells += [f"{ms:.1f}", f"{batch * 1000 / ms:.1f}", f"{mb:.0f}"]
        cells += [f"{result['minicaffe'][0] / result[e][0]:.2f}"
                  for e in engines if e != "minicaffe" and "minicaffe" in engines]
        if {"minicaffe", "torch"} <= set(engines):
            cells.append(f"{result['minicaffe'][2]:.4f} / {result['torch'][2]:.4f}")
        table.append(cells)
    print_table(header, table)


def scaling_table(rows, engines):
    header = ["LeNet batch"]
    for e in engines:
        header += [f"{LABELS[e]} ms/step", f"{LABELS[e]} ms/image"]
    if {"minicaffe", "torch"} <= set(engines):
        header.append("minicaffe / PyTorch")
    table = []
    for batch, result in rows:
        cells = [str(batch)]
        for e in engines:
            cells += [f"{result[e][0]:.1f}", f"{result[e][0] / batch:.3f}"]
        if {"minicaffe", "torch"} <= set(engines):
            cells.append(f"{result['minicaffe'][0] / result['torch'][0]:.2f}")
        table.append(cells)
    print_table(header, table)


def layer_table(name, split, top):
    total = split["forward"] + split["backward"]
    print(f"\n{name}: minicaffe per layer (`minicaffe time`'s timer), forward {split['forward']:.1f} ms + "
          f"backward {split['backward']:.1f} ms; the {top} slowest layers:")
    ranked = sorted(split["layers"], key=lambda x: -(x[2] + x[3]))[:top]
    print_table(["layer", "type", "forward ms", "backward ms", "share"],
                [[n, t, f"{f:.2f}", f"{b:.2f}", f"{(f + b) / total:.0%}"] for n, t, f, b in ranked])
    by_type = {}
    for _, kind, f, b in split["layers"]:
        count, forward, backward = by_type.get(kind, (0, 0.0, 0.0))
        by_type[kind] = (count + 1, forward + f, backward + b)
    print(f"\n{name}: minicaffe per layer type")
    print_table(["type", "layers", "forward ms", "backward ms", "share"],
                [[kind, str(count), f"{f:.1f}", f"{b:.1f}", f"{(f + b) / total:.0%}"]
                 for kind, (count, f, b) in sorted(by_type.items(), key=lambda x: -(x[1][1] + x[1][2]))
                 if f + b > 0])


def main():
    names = [n for n, _, _, _ in NETS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=",".join(names), help="comma-separated subset of: " + ", ".join(names))
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="comma-separated subset of: minicaffe, torch (Caffe comes with --caffe)")
    parser.add_argument("--caffe", help="a Caffe binary: adds a column of `caffe train` steps "
                                        "(forward, backward and update, on the same net and solver)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2),
                        help="BLAS / OpenMP / torch / MINICAFFE_THREADS threads for every engine "
                             "(default: OMP_NUM_THREADS, else 2)")
    parser.add_argument("--rounds", type=int, help="alternated rounds per engine, medians shown (default 3)")
    parser.add_argument("--steps", type=int, help="timed steps per round (default per net: "
                        + ", ".join(f"{n} {s}" for n, _, _, s in NETS) + ")")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 steps, 1 warm-up step")
    parser.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True,
                        help="the LeNet batch 16 / 64 / 256 table (default on)")
    parser.add_argument("--numpy", action="store_true",
                        help="add a column for minicaffe with its compiled kernels off (MINICAFFE_JIT=0)")
    parser.add_argument("--layers", action="store_true", help="add minicaffe's per-layer forward/backward split")
    parser.add_argument("--top", type=int, default=10, help="layers shown per net with --layers (default 10)")
    parser.add_argument("--mnist", default=str(SHARED / "data" / "mnist"), help="folder of the MNIST IDX files")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # engine, spec JSON
    parser.add_argument("--layer-worker", help=argparse.SUPPRESS)     # spec JSON
    parser.add_argument("--prepare", nargs="+", help=argparse.SUPPRESS)  # folder, net:batch...
    args = parser.parse_args()
    quick = args.quick
    args.rounds = args.rounds if args.rounds is not None else 1 if quick else 3
    args.warmup = args.warmup if args.warmup is not None else 1 if quick else 3
    if args.prepare:
        folder, *pairs = args.prepare
        return print(json.dumps([prepare(n, int(b), pathlib.Path(folder), args.mnist)
                                 for n, b in (p.split(":") for p in pairs)]))
    if args.worker:
        return worker(args.worker[0], json.loads(args.worker[1]), args.warmup, args.steps, args.threads)
    if args.layer_worker:
        return layer_worker(json.loads(args.layer_worker), args.steps)

    chosen = [n.strip() for n in args.nets.split(",") if n.strip()]
    if not chosen or set(chosen) - set(names):
        parser.error(f"unknown net(s) {', '.join(sorted(set(chosen) - set(names))) or '(none)'}; "
                     f"choose from {', '.join(names)}")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or set(engines) - set(ENGINES):
        parser.error(f"--engines takes a subset of {', '.join(ENGINES)}, got {args.engines!r}")
    if min(args.rounds, args.threads, args.top, 1 if args.steps is None else args.steps) < 1 or args.warmup < 0:
        parser.error("--rounds, --steps, --threads and --top must be at least 1, --warmup at least 0")
    if args.caffe and not os.access(args.caffe, os.X_OK):
        parser.error(f"--caffe {args.caffe}: not an executable file")
    if "torch" in engines and not torch_available():
        print(TORCH_MISSING, file=sys.stderr)
        engines.remove("torch")
        if not engines and not args.caffe:
            parser.error("no engine left to run")
    if args.numpy:
        engines.append("minicaffe-numpy")
    default_steps = {n: s for n, _, _, s in NETS}
    scaling_batches = SCALING_BATCHES if args.scaling and engines else ()  # Caffe is not in that table

    def steps_for(name):
        return args.steps or (2 if quick else default_steps[name])

    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(args, pathlib.Path(tmp))
        batch_of = {n: b for n, _, b, _ in NETS}
        runner.prepare([(n, batch_of[n]) for n in chosen] + [("lenet", b) for b in scaling_batches])
        main_engines = engines + (["caffe"] if args.caffe else [])
        rows = [(n, batch_of[n], runner.measure(n, batch_of[n], main_engines, steps_for(n))) for n in chosen]
        done = {b: result for n, b, result in rows if n == "lenet"}  # same steps: reuse batch 64
        scaling = [(b, done.get(b) or runner.measure("lenet", b, engines, steps_for("lenet")))
                   for b in scaling_batches]
        splits = [(n, runner.layers(n, batch_of[n], steps_for(n)))
                  for n in (chosen if args.layers and "minicaffe" in engines else [])]

    print_command(__file__, runner.minicaffe_env)
    print(f"one training step (forward, backward, SGD update with momentum) in ms: median of {args.rounds} "
          f"alternated round(s) of " + ", ".join(f"{n} {steps_for(n)}" for n in chosen) + f" steps after "
          f"{args.warmup} warm-up step(s); peak RSS MB; {args.threads} threads")
    net_table(rows, main_engines)
    if args.caffe:
        print("Caffe's column is `caffe train` with the same net and solver settings: the median gap between "
              "its per-iteration log lines. Its Input blobs hold zeros and its weights come from its own "
              "fillers (same shapes and work, other values), so it has no first-loss entry.")
    if {"minicaffe", "torch"} <= set(engines):
        print("first loss: both engines' loss on the first batch from the same weights "
              "(CaffeNet's differs by its Dropout masks).")
    if scaling:
        print(f"\nLeNet cost against batch size ({args.rounds} round(s)); ms/image should stay flat or fall:")
        scaling_table(scaling, engines)
    for name, split in splits:
        layer_table(name, split, args.top)


if __name__ == "__main__":
    main()
