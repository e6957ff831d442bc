"""`minicaffe detect INPUT OUT.csv --model_def ... --pretrained_model ...`: windowed detection,
as Caffe's python/detect.py.

INPUT is a .csv of windows (filename,ymin,xmin,ymax,xmax per row; --crop_mode list) or a
.txt of image paths (--crop_mode selective_search, which needs the Selective Search package
pycaffe uses). OUT.csv gets filename, the window and one column class0..classN-1 per score.
"""
from .classify import add_preprocessing, preprocessing

COORD_COLS = ["ymin", "xmin", "ymax", "xmax"]


def register(subparsers):
    p = subparsers.add_parser(
        "detect", help="score image windows (Caffe's python/detect.py)",
        description="Run a deploy net over windows of images (R-CNN style) and write one CSV row "
                    "of class scores per window.")
    p.add_argument("input_file", metavar="INPUT.csv|txt")
    p.add_argument("output_file", metavar="OUT.csv")
    p.add_argument("--crop_mode", default="selective_search", choices=["list", "selective_search"],
                   help="windows from the input .csv (list) or from Selective Search")
    add_preprocessing(p, images_dim=False)
    p.add_argument("--context_pad", type=int, default=16,
                   help="pixels of context around each window (default 16)")
    p.set_defaults(func=run)


def _read_windows(path):
    import csv

    import numpy as np
    images = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ["filename"] + COORD_COLS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: a window list needs the columns filename,"
                             f"{','.join(COORD_COLS)}; missing {missing}")
        for line, row in enumerate(reader, start=2):
            try:
                window = np.array([int(float(row[c])) for c in COORD_COLS])
            except ValueError:
                raise ValueError(f"{path}:{line}: window coordinates must be numbers") from None
            images.setdefault(row["filename"], []).append(window)
    return list(images.items())


def run(args):
    import csv
    import io
    import os

    from ..detector import Detector
    from ..proto_io import atomic_write
    if not args.output_file.endswith(".csv"):
        raise ValueError(f"{args.output_file}: detect writes .csv (pycaffe's pandas HDF5 output "
                         f"is not supported)")
    mean, swap = preprocessing(args)
    detector = Detector(args.model_def, args.pretrained_model, mean=mean,
                        input_scale=args.input_scale, raw_scale=args.raw_scale,
                        channel_swap=swap, context_pad=args.context_pad)
    path = os.path.expanduser(args.input_file)
    if args.crop_mode == "list":
        detections = detector.detect_windows(_read_windows(path))
    else:
        with open(path) as f:
            detections = detector.detect_selective_search([l.strip() for l in f if l.strip()])
    print(f"Processed {len(detections)} windows.")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    classes = len(detections[0]["prediction"]) if detections else 0
    writer.writerow(["filename"] + COORD_COLS + [f"class{i}" for i in range(classes)])
    for d in detections:
        writer.writerow([d["filename"]] + [int(v) for v in d["window"]]
                        + [f"{float(v):.9g}" for v in d["prediction"]])
    atomic_write(args.output_file, text.getvalue().encode())
    print(f"Saved to {args.output_file}")
    return 0
