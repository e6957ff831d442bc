"""`minicaffe import-onnx`: an ONNX model as a Caffe prototxt and caffemodel.

    minicaffe import-onnx model.onnx deploy.prototxt weights.caffemodel

Common ops only (Conv, ConvTranspose, Gemm/MatMul, Relu/LeakyRelu/Sigmoid/Tanh, pooling,
BatchNormalization, Add/Mul/Sum, Concat, Softmax, Reshape/Flatten, nearest Resize/Upsample,
Dropout, Clip, Split/Slice); any other op is named in the error.
"""


def register(subparsers):
    p = subparsers.add_parser(
        "import-onnx", help="convert an ONNX model to a Caffe model (needs minicaffe[onnx])",
        description="Write an ONNX model as a Caffe net definition and its weights.")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("prototxt", metavar="OUT.prototxt")
    p.add_argument("caffemodel", metavar="OUT.caffemodel")
    p.set_defaults(func=run)


def run(args):
    from .. import onnx as mo
    net = mo.import_model(args.model, args.prototxt, args.caffemodel)
    print(f"wrote {args.prototxt} and {args.caffemodel}: {len(net.layer)} layers")
    return 0
