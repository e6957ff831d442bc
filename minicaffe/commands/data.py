"""Dataset subcommands: `data mnist`, `convert-imageset`, `compute-image-mean`.

    minicaffe data mnist --out data/mnist
    minicaffe convert-imageset --resize_height 32 --resize_width 32 images/ train.txt train_lmdb
    minicaffe compute-image-mean train_lmdb mean.binaryproto
"""
import sys


def register(subparsers):
    data = subparsers.add_parser("data", help="download and convert standard datasets",
                                 description="Download and convert standard datasets to Caffe databases.")
    datasets = data.add_subparsers(dest="dataset", metavar="DATASET")
    data.set_defaults(func=lambda args: _no_dataset(data))

    mnist = datasets.add_parser(
        "mnist", help="MNIST to mnist_train_lmdb and mnist_test_lmdb",
        description="Get the four MNIST files (download from public mirrors, verified by MD5, or "
                    "read a local folder of .gz or plain IDX files) and write mnist_train_lmdb and "
                    "mnist_test_lmdb as Caffe's convert_mnist_data does.")
    mnist.add_argument("--source", metavar="DIR_OR_URL",
                       help="folder holding the IDX files, or a base URL to download them from "
                            "(default: files already in --out, else the public mirrors)")
    mnist.add_argument("--out", default="data/mnist", metavar="DIR",
                       help="where the files and databases go (default: %(default)s)")
    mnist.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"])
    mnist.add_argument("--force", action="store_true", help="rebuild databases that already exist")
    mnist.add_argument("--no-verify", dest="verify", action="store_false",
                       help="skip the MD5 check (for MNIST-format datasets such as Fashion-MNIST)")
    mnist.set_defaults(func=run_mnist)

    conv = subparsers.add_parser(
        "convert-imageset", help="images listed in a file to an LMDB of Datums",
        description="Convert images to a Caffe database, as Caffe's convert_imageset: LIST has "
                    "lines 'relative/path.jpg label'; files are read from ROOT.")
    conv.add_argument("root", metavar="ROOT", help="folder the listed paths are relative to")
    conv.add_argument("list", metavar="LIST", help="text file of 'path label' lines")
    conv.add_argument("db", metavar="DB", help="database to create")
    conv.add_argument("--gray", action="store_true", help="store one grey channel")
    conv.add_argument("--shuffle", action="store_true", help="shuffle the list first")
    conv.add_argument("--resize_height", "--resize-height", type=int, default=0, metavar="H")
    conv.add_argument("--resize_width", "--resize-width", type=int, default=0, metavar="W")
    conv.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"])
    conv.add_argument("--check_size", "--check-size", action="store_true",
                      help="check that all images have the same size")
    conv.add_argument("--encoded", action="store_true", help="store the encoded image files")
    conv.add_argument("--encode_type", "--encode-type", default="", metavar="EXT",
                      help="re-encode as this type (png, jpg, ...); implies --encoded")
    conv.add_argument("--seed", type=int, default=None, help="random seed for --shuffle")
    conv.set_defaults(func=run_convert_imageset)

    mean = subparsers.add_parser(
        "compute-image-mean", help="mean image of a database, as a .binaryproto",
        description="Average every Datum of a database into a mean image (Caffe's "
                    "compute_image_mean) and print the per-channel means.")
    mean.add_argument("db", metavar="DB")
    mean.add_argument("output", metavar="MEAN.binaryproto", nargs="?",
                      help="file to write (omit to only print the channel means)")
    mean.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"])
    mean.set_defaults(func=run_compute_image_mean)


def _no_dataset(parser):
    parser.print_help()
    return 1


def _log(message):
    print(message, file=sys.stderr)


def run_mnist(args):
    from ..datasets.mnist import prepare_mnist
    dbs = prepare_mnist(args.out, source=args.source, force=args.force, backend=args.backend,
                        verify=args.verify, log=_log)
    for path in dbs.values():
        print(path)
    return 0


def run_convert_imageset(args):
    import numpy as np
    from tqdm import tqdm
    from ..datasets.imageset import convert_imageset, read_image_list
    total = len(read_image_list(args.list))
    rng = np.random.default_rng(args.seed) if args.seed is not None else None
    with tqdm(total=total, unit="img", disable=not sys.stderr.isatty()) as bar:
        count = convert_imageset(args.root, args.list, args.db, gray=args.gray, shuffle=args.shuffle,
                                 resize_height=args.resize_height, resize_width=args.resize_width,
                                 backend=args.backend, check_size=args.check_size,
                                 encoded=args.encoded, encode_type=args.encode_type, rng=rng,
                                 progress=bar.update)
    _log(f"Processed {count} files.")
    return 0


def run_compute_image_mean(args):
    from ..datasets.imageset import compute_image_mean, write_mean_file
    mean = compute_image_mean(args.db, backend=args.backend)
    if args.output:
        write_mean_file(mean, args.output)
        _log(f"Wrote the {'x'.join(map(str, mean.shape))} mean image to {args.output}")
    channel_means = mean.reshape(mean.shape[0], -1).mean(axis=1, dtype="float64")
    for c, value in enumerate(channel_means):
        print(f"mean_value channel [{c}]: {value:.6g}")
    return 0
