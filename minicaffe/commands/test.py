"""`minicaffe test`: score a trained model over N batches (Caffe's `caffe test`).

    minicaffe test --model lenet_train_test.prototxt --weights lenet_iter_10000.caffemodel --iterations 100

Logs each batch's outputs, then the mean of each output over all batches.
"""
import logging

import numpy as np

from .train import CommandError, add_common_flags, add_flag, note_gpu, stages_from, use_threads

log = logging.getLogger("minicaffe.test")


def register(subparsers):
    p = subparsers.add_parser(
        "test", help="score a model",
        description="Run the TEST phase of a model for N batches with trained weights and report "
                    "each output per batch and on average, as `caffe test`.")
    add_flag(p, "model", metavar="FILE", help="the model definition (required)")
    add_flag(p, "weights", metavar="W.caffemodel[,...]",
                   help="the trained weights (required), comma separated")
    add_flag(p, "iterations", type=int, default=50, metavar="N",
                   help="number of batches to run (default 50)")
    p.add_argument("--inference", action="store_true",
                   help="let blobs share buffers once no later layer reads them (less memory; "
                        "the outputs are still reported)")
    add_common_flags(p)
    p.set_defaults(func=run)


def run(args):
    from ..logging_util import logging_to
    from ..net import Net
    from ..proto import caffe_pb2

    with logging_to(args.log):
        if not args.model:
            raise CommandError("need a model definition to score: --model FILE")
        if not args.weights:
            raise CommandError("need model weights to score: --weights FILE")
        if args.iterations < 1:
            raise CommandError(f"--iterations must be at least 1, got {args.iterations}")
        note_gpu(args)
        use_threads(args)
        net = Net(args.model, caffe_pb2.TEST, level=args.level, stages=stages_from(args),
                  inference=args.inference)
        for path in args.weights.split(","):
            if path.strip():
                net.copy_from(path.strip())
        log.info("Running for %d iterations.", args.iterations)
        weights = net.blob_loss_weights
        scores = None
        loss = 0.0
        for i in range(args.iterations):
            loss += net.forward_loss()
            values = []
            for name in net.outputs:
                for score in net.blobs[name].data.ravel():
                    log.info("Batch %d, %s = %s", i, name, f"{float(score):g}")
                    values.append(float(score))
            values = np.array(values)
            scores = values if scores is None else scores + values
        log.info("Loss: %s", f"{loss / args.iterations:g}")
        k = 0
        for name in net.outputs:
            w = weights.get(name, 0.0)
            for _ in range(net.blobs[name].count()):
                mean = scores[k] / args.iterations
                extra = f" (* {w:g} = {w * mean:g} loss)" if w else ""
                log.info("%s = %s%s", name, f"{mean:g}", extra)
                k += 1
    return 0
