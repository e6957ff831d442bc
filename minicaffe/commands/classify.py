"""`minicaffe classify INPUT OUT.npy --model_def deploy.prototxt --pretrained_model w.caffemodel`:
class scores for images, as Caffe's python/classify.py.

INPUT is an image, a folder of images (--ext), or a .npy array of (N, H, W, K) images; the
(N, classes) scores go to OUT.npy. Ten-crop oversampling unless --center_only.
"""


def add_preprocessing(p, images_dim=True):
    """The preprocessing flags classify.py and detect.py share (their defaults)."""
    p.add_argument("--model_def", required=True, help="the deploy prototxt")
    p.add_argument("--pretrained_model", required=True, help="the trained .caffemodel")
    p.add_argument("--gpu", action="store_true", help="refused: minicaffe runs on the CPU")
    if images_dim:
        p.add_argument("--images_dim", default="256,256",
                       help="canonical 'height,width' of the input images (default 256,256)")
    p.add_argument("--mean_file", default="",
                   help="a .npy mean, (K,) per channel or (K, H, W) (default: none)")
    p.add_argument("--input_scale", type=float, default=None,
                   help="multiply the preprocessed input by this")
    p.add_argument("--raw_scale", type=float, default=255.0,
                   help="multiply the raw [0, 1] input by this before the mean (default 255)")
    p.add_argument("--channel_swap", default="2,1,0",
                   help="channel order for the net; the default turns RGB into Caffe's BGR "
                        "('' for none)")


def preprocessing(args):
    """(mean, channel_swap) from the shared flags."""
    import numpy as np
    if args.gpu:
        raise RuntimeError("--gpu: minicaffe runs on the CPU only; drop the flag")
    mean = np.load(args.mean_file) if args.mean_file else None
    swap = [int(s) for s in args.channel_swap.split(",")] if args.channel_swap else None
    return mean, swap


def register(subparsers):
    p = subparsers.add_parser(
        "classify", help="class scores for images (Caffe's python/classify.py)",
        description="Classify an image, a folder of images or a .npy of images with a deploy "
                    "net and its weights; save the (N, classes) scores as .npy.")
    p.add_argument("input_file", metavar="INPUT")
    p.add_argument("output_file", metavar="OUT.npy")
    add_preprocessing(p)
    p.add_argument("--center_only", action="store_true",
                   help="score the centre crop alone instead of ten crops")
    p.add_argument("--ext", default="jpg", help="image extension to read from a folder (default jpg)")
    p.set_defaults(func=run)


def run(args):
    import glob
    import io
    import os
    import time

    import numpy as np

    from ..classifier import Classifier
    from ..io import load_image
    from ..proto_io import atomic_write
    mean, swap = preprocessing(args)
    dims = [int(s) for s in args.images_dim.split(",")]
    classifier = Classifier(args.model_def, args.pretrained_model, image_dims=dims, mean=mean,
                            input_scale=args.input_scale, raw_scale=args.raw_scale,
                            channel_swap=swap)
    path = os.path.expanduser(args.input_file)
    if path.endswith("npy"):
        inputs = np.load(path)
    elif os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*." + args.ext)))
        if not files:
            raise FileNotFoundError(f"{path}: no *.{args.ext} images in the folder")
        inputs = [load_image(f) for f in files]
    else:
        inputs = [load_image(path)]
    print(f"Classifying {len(inputs)} inputs.")
    start = time.time()
    predictions = classifier.predict(inputs, not args.center_only)
    print(f"Done in {time.time() - start:.2f} s.")
    buf = io.BytesIO()
    np.save(buf, predictions)
    out = args.output_file if args.output_file.endswith(".npy") else args.output_file + ".npy"
    atomic_write(out, buf.getvalue())   # np.save's naming: .npy added when missing
    print(f"Saving results into {out}")
    return 0
