"""`minicaffe export-onnx`: a Caffe model as ONNX, optionally checked in onnxruntime.

    minicaffe export-onnx deploy.prototxt weights.caffemodel model.onnx --check
    minicaffe export-onnx deploy.prototxt weights.caffemodel model.onnx --batch dynamic --opset 13

The net is built at TEST phase. --check runs the ONNX model in onnxruntime on random
input (or the --input .npy files, one per net input) and fails if any output differs from
minicaffe's forward by more than 1e-4 relative to the output's largest magnitude.
"""


def register(subparsers):
    p = subparsers.add_parser(
        "export-onnx", help="export a model to ONNX (needs minicaffe[onnx])",
        description="Convert a Caffe net and its weights to an ONNX model; a layer ONNX cannot "
                    "express is named in an error, never dropped.")
    p.add_argument("model", metavar="NET.prototxt")
    p.add_argument("weights", metavar="WEIGHTS.caffemodel", nargs="?",
                   help="trained weights (omit to export the fillers' values)")
    p.add_argument("output", metavar="OUT.onnx")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; 13 to 21)")
    p.add_argument("--batch", default=None, metavar="dynamic|N",
                   help="batch size of the exported inputs: a number, or 'dynamic' (default: "
                        "the prototxt's)")
    p.add_argument("--check", action="store_true",
                   help="run the model in onnxruntime and compare every output with minicaffe")
    p.add_argument("--input", action="append", default=[], metavar="X.npy",
                   help="input array for --check, one per net input in order (default random)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest relative error --check accepts (default 1e-4)")
    p.set_defaults(func=run)


def _batch(text):
    from .train import CommandError
    if text is None or text == "dynamic":
        return text
    try:
        return int(text)
    except ValueError:
        raise CommandError(f"--batch must be a positive number or 'dynamic', got {text!r}") from None


def run(args):
    from .. import onnx as mo
    from ..net import Net
    from ..proto import caffe_pb2

    mo.require("onnx")
    if args.check:
        mo.require("onnxruntime")
    batch = _batch(args.batch)
    net = Net(args.model, caffe_pb2.TEST, weights=args.weights)
    mo.export(net, args.output, opset=args.opset or mo.DEFAULT_OPSET, batch=batch)
    print(f"wrote {args.output}: {len(net.layers)} layers, opset {args.opset or mo.DEFAULT_OPSET}")
    if args.check:
        result = mo.check(net, args.output, inputs=args.input or None, tolerance=args.tolerance)
        print(f"check {result}")
    return 0
