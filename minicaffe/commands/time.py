"""`minicaffe time`: per-layer forward and backward timings (Caffe's `caffe time`).

    minicaffe time --model lenet_train_test.prototxt --iterations 20 [--phase TEST]
"""
import logging
import math
import time

import numpy as np

from .train import CommandError, add_common_flags, add_flag, note_gpu, stages_from, use_threads

log = logging.getLogger("minicaffe.time")


def register(subparsers):
    p = subparsers.add_parser(
        "time", help="benchmark a model's execution time",
        description="Time every layer's forward and backward pass over N iterations and the "
                    "totals, as `caffe time`. Data layers read real data, so their time counts.")
    add_flag(p, "model", metavar="FILE", help="the model definition (required)")
    add_flag(p, "iterations", type=int, default=50, metavar="N",
                   help="number of forward-backward passes to time (default 50)")
    add_flag(p, "phase", default="TRAIN", metavar="TRAIN|TEST",
                   help="network phase (default TRAIN)")
    add_flag(p, "weights", metavar="W.caffemodel[,...]",
                   help="optional weights to load first")
    p.add_argument("--inference", action="store_true",
                   help="time the forward pass alone, on a net whose blobs share buffers once "
                        "no later layer reads them (Net(..., inference=True))")
    add_common_flags(p)
    p.set_defaults(func=run)


def _ms(seconds):
    return f"{seconds * 1000:g}"


def run(args):
    from ..logging_util import logging_to
    from ..net import Net
    from ..proto import caffe_pb2

    with logging_to(args.log):
        if not args.model:
            raise CommandError("need a model definition to time: --model FILE")
        phase = args.phase.upper()
        if phase not in ("TRAIN", "TEST"):
            raise CommandError(f'--phase must be "TRAIN" or "TEST", got {args.phase!r}')
        if args.iterations < 1:
            raise CommandError(f"--iterations must be at least 1, got {args.iterations}")
        note_gpu(args)
        use_threads(args)
        net = Net(args.model, caffe_pb2.Phase.Value(phase), level=args.level,
                  stages=stages_from(args), inference=args.inference)
        if args.weights:
            for path in args.weights.split(","):
                if path.strip():
                    net.copy_from(path.strip())

        # One untimed pass first, so buffers are allocated before timing starts.
        log.info("Performing Forward")
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            loss = net.forward_loss()
        log.info("Initial loss: %s", f"{loss:g}")
        if not math.isfinite(loss):
            where = net.non_finite_report()
            raise CommandError(f"the initial loss is {loss:g}" + (f": {where}" if where else "")
                               + "; the timings would be of non-finite arithmetic")
        if not args.inference:
            log.info("Performing Backward")
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                net.backward_from_to()

        n = args.iterations
        log.info("*** Benchmark begins ***")
        log.info("Testing for %d iterations.", n)
        forward_time, backward_time, total_forward, total_backward, total = time_layers(
            net, n, inference=args.inference)
        log.info("Average time per layer: ")
        for i, name in enumerate(net.layer_names):
            log.info("%10s\tforward: %s ms.", name, _ms(forward_time[i] / n))
            if not args.inference:
                log.info("%10s\tbackward: %s ms.", name, _ms(backward_time[i] / n))
        log.info("Average Forward pass: %s ms.", _ms(total_forward / n))
        if not args.inference:
            log.info("Average Backward pass: %s ms.", _ms(total_backward / n))
        log.info("Average Forward-Backward: %s ms.", _ms(total / n))
        log.info("Total Time: %s ms.", _ms(total))
        log.info("*** Benchmark ends ***")
    return 0


def time_layers(net, iterations, inference=False):
    """Per-layer forward and backward times of `iterations` passes over `net`, as `caffe time`.

    Returns (forward, backward, total_forward, total_backward, total): the first two are lists
    of seconds summed over the iterations, one entry per layer in net.layer_names order; the
    totals are seconds summed too. Every layer's Backward runs, even ones the net would skip,
    like Caffe's benchmark; `inference` times the forward plan alone (folded layers report 0).
    The caller runs one untimed pass first so that buffers exist before timing starts.
    """
    layers = net.layers
    bottoms = [[net.blobs[n] for n in names] for names in net.bottom_ids]
    tops = [[net.blobs[n] for n in names] for names in net.top_ids]
    # An inference net's folded BatchNorm/Scale layers are not run: they report 0 ms. A training
    # net's fused BatchNorm -> Scale -> ReLU chains (fuse.py) report their time on the BatchNorm.
    if inference:
        steps, backward_steps = net.forward_plan(), []
    elif net._fusing():
        steps, backward_steps = net.fused_steps()
    else:
        steps = list(zip(range(len(layers)), layers, bottoms, tops))
        backward_steps = [(i, layers[i], True) for i in reversed(range(len(layers)))]
    forward_time = [0.0] * len(layers)
    backward_time = [0.0] * len(layers)
    total_forward = total_backward = 0.0
    clock = time.perf_counter
    start_total = clock()
    for j in range(iterations):
        start_iter = clock()
        for i, layer, bottom, top in steps:
            t = clock()
            layer.reshape(bottom, top)
            layer.run_forward(bottom, top)
            forward_time[i] += clock() - t
        total_forward += clock() - start_iter
        start_backward = clock()
        for i, layer, _ in backward_steps:
            t = clock()
            layer.run_backward(tops[i], net.bottom_need_backward[i], bottoms[i])
            backward_time[i] += clock() - t
        total_backward += clock() - start_backward
        log.info("Iteration: %d forward-backward time: %s ms.", j + 1, _ms(clock() - start_iter))
    return forward_time, backward_time, total_forward, total_backward, clock() - start_total
