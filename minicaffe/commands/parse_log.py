"""`minicaffe parse-log LOG OUTDIR`: a training log as CSV tables, as Caffe's tools/extra/parse_log.py.

    minicaffe train --solver models/lenet/lenet_solver.prototxt --log lenet.log
    minicaffe parse-log lenet.log out/        # writes out/lenet.log.train and out/lenet.log.test

Each table has NumIters, Seconds, LearningRate and one column per net output.
"""


def register(subparsers):
    p = subparsers.add_parser(
        "parse-log", help="turn a training log into .train/.test CSV tables",
        description="Parse a Caffe or minicaffe training log into LOG.train and LOG.test CSV "
                    "files in OUTDIR (Caffe's parse_log.py).")
    p.add_argument("logfile_path", metavar="LOG")
    p.add_argument("output_dir", metavar="OUTDIR")
    p.add_argument("--delimiter", default=",", help="column delimiter (default ',')")
    p.add_argument("--verbose", action="store_true", help="name the files written")
    p.set_defaults(func=run)


def run(args):
    import os
    from ..training_log import parse_log, table_paths, write_tables
    if not os.path.isdir(args.output_dir):
        raise FileNotFoundError(f"{args.output_dir}: no such output directory")
    train, test = parse_log(args.logfile_path)
    written = write_tables(args.logfile_path, args.output_dir, train, test, args.delimiter)
    if args.verbose:
        for path, rows in zip(table_paths(args.logfile_path, args.output_dir), (train, test)):
            print(f"Wrote {path}" if rows else f"Not writing {path}; no lines to write")
    elif not written:
        print(f"{args.logfile_path}: no net output lines; nothing written")
    return 0
