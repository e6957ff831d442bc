"""`minicaffe train`: train or finetune a model from a solver file (Caffe's `caffe train`).

    minicaffe train --solver lenet_solver.prototxt
    minicaffe train --solver S --weights pretrained.caffemodel        # finetune
    minicaffe train --solver S --snapshot lenet_iter_5000.solverstate # resume
"""
import argparse
import contextlib
import logging
import os
import shutil
import sys

log = logging.getLogger("minicaffe.train")

SIGNAL_EFFECTS = ("stop", "snapshot", "none")


from ..errors import CommandError  # noqa: E402  (other commands import it from here)


def add_flag(parser, name, **kwargs):
    """`--name`, plus a hidden `-name` so Caffe's gflags spelling (`-solver x`) works too."""
    parser.add_argument(f"--{name}", **kwargs)
    hidden = {k: v for k, v in kwargs.items() if k in ("type", "metavar")}
    parser.add_argument(f"-{name}", dest=name, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                        **hidden)


def add_common_flags(parser, level_stage=True):
    """Flags shared by train, test and time."""
    if level_stage:
        add_flag(parser, "level", type=int, default=0,
                            help="network level for include/exclude rules (default 0)")
        add_flag(parser, "stage", default="", metavar="S1,S2",
                            help="network stages for include/exclude rules, comma separated")
    add_flag(parser, "gpu", default="", help=argparse.SUPPRESS)
    add_flag(parser, "log", metavar="FILE", help="also write the log lines to FILE")
    add_flag(parser, "threads", type=int, metavar="N",
             help="threads for memory-bound layers (ReLU, pooling, Eltwise, ...); default "
                  "$MINICAFFE_THREADS, else $OMP_NUM_THREADS, else the number of cores. "
                  "The BLAS library's own threads follow OMP_NUM_THREADS / OPENBLAS_NUM_THREADS")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")


def stages_from(args):
    return [s for s in args.stage.split(",") if s]


def note_gpu(args):
    if args.gpu:
        log.warning("--gpu %s ignored: minicaffe runs on the CPU", args.gpu)
    log.info("Use CPU.")


def use_threads(args):
    """Apply --threads to the shared pool of minicaffe.threads (train, test and time)."""
    from .. import threads
    if args.threads is not None:
        if args.threads < 1:
            raise CommandError(f"--threads must be at least 1, got {args.threads}")
        threads.set_num_threads(args.threads)
    log.info("Using %d thread(s) for memory-bound layers.", threads.get_num_threads())


def register(subparsers):
    p = subparsers.add_parser(
        "train", help="train or finetune a model",
        description="Train a model with a Caffe solver file (prototxt or YAML), as `caffe train`. "
                    "Ctrl-C and SIGTERM stop after the current iteration (leaving a snapshot "
                    "when snapshot_after_train is on) and exit with status 130 / 143; SIGHUP "
                    "writes a snapshot and continues. Training that diverges (a non-finite "
                    "loss or weight) stops with an error naming the layer. "
                    "Caffe's flag spellings work too (-solver S, --solver=S).")
    add_flag(p, "solver", metavar="FILE", help="the solver definition (required)")
    add_flag(p, "weights", metavar="A.caffemodel[,B.caffemodel]",
                   help="pretrained weights to finetune from, comma separated "
                        "(not together with --snapshot)")
    add_flag(p, "snapshot", metavar="X.solverstate",
                   help="a solver state to resume training from")
    add_flag(p, "sigint_effect", default="stop", metavar="EFFECT",
                   help="what Ctrl-C does: stop, snapshot or none (default stop)")
    add_flag(p, "sighup_effect", default="snapshot", metavar="EFFECT",
                   help="what SIGHUP does: stop, snapshot or none (default snapshot)")
    add_flag(p, "sigterm_effect", default="stop", metavar="EFFECT",
                   help="what SIGTERM (a scheduler or container stopping the job) does: stop, "
                        "snapshot or none (default stop, like Ctrl-C)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is shown only when stdout is a terminal)")
    add_common_flags(p)
    p.set_defaults(func=run)


@contextlib.contextmanager
def progress_bar(solver, enabled, file=None):
    """A tqdm bar over the solver's iterations showing the smoothed loss and the lr."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm
    file = file if file is not None else sys.stdout
    try:
        size = os.get_terminal_size(file.fileno())
    except (AttributeError, OSError, ValueError):
        size = os.terminal_size((0, 0))
    if size.columns and size.lines:
        shape = {"dynamic_ncols": True}
    else:   # some ptys (e.g. fresh containers) report 0x0, which would hide the bar
        fallback = shutil.get_terminal_size()
        shape = {"ncols": fallback.columns, "nrows": fallback.lines}
    bar = tqdm(total=solver.param.max_iter, initial=solver.iter, unit="iter", file=file,
               desc="train", **shape)

    def advance():
        bar.set_postfix_str(f"loss={solver.smoothed_loss:.4g} lr={solver.learning_rate:.3g}",
                            refresh=False)
        bar.update(solver.iter - bar.n)

    solver.add_callback(on_iteration_end=advance)
    try:
        yield bar
    finally:
        bar.close()


def run(args):
    from ..logging_util import logging_to
    from ..solvers import load_solver_param

    with logging_to(args.log):
        if not args.solver:
            raise CommandError("need a solver definition to train: --solver FILE")
        if args.snapshot and args.weights:
            raise CommandError("give a snapshot to resume training or weights to finetune, not both")
        for name in ("sigint_effect", "sighup_effect", "sigterm_effect"):
            if getattr(args, name) not in SIGNAL_EFFECTS:
                raise CommandError(f"invalid --{name} {getattr(args, name)!r}; use one of "
                                   f"{', '.join(SIGNAL_EFFECTS)}")
        param = load_solver_param(args.solver)
        param.train_state.level = args.level
        param.train_state.stage.extend(stages_from(args))
        if args.snapshot:
            param.ClearField("weights")
        elif args.weights:
            param.ClearField("weights")
            param.weights.append(args.weights)
        comm = _start_parallel()
        note_gpu(args)
        use_threads(args)
        try:
            return _train(args, param, comm)
        except BaseException as exc:
            if comm is not None and not isinstance(exc, SystemExit):
                from ..parallel.mpi import abort
                abort(exc)   # the other ranks would wait for this one's gradients forever
            raise


def _start_parallel():
    """The MPI communicator when started by mpirun with several processes, else None."""
    from ..parallel import context
    if context.launched_size() <= 1:
        return None
    from ..parallel import init
    comm = init()
    return comm if comm.Get_size() > 1 else None


def _train(args, param, comm):
    from ..solvers import get_solver
    from ..solvers.signals import SignalHandler
    solver = get_solver(param, source=args.solver)
    if comm is not None:
        from ..parallel import data_parallel
        data_parallel(solver, comm=comm)
    show_bar = not args.no_progress and sys.stdout.isatty() and comm is None
    with SignalHandler(args.sigint_effect, args.sighup_effect,
                       args.sigterm_effect) as signals:
        solver.set_action_function(signals.check)
        if args.snapshot:
            log.info("Resuming from %s", args.snapshot)
            solver.restore(args.snapshot)
        with progress_bar(solver, show_bar):
            log.info("Starting Optimization")
            solver.solve()
    status = signals.exit_status() if solver.requested_early_exit else 0
    if status:
        log.warning("Stopped by %s at iteration %d of %d; exit status %d", signals.stopped_by,
                    solver.iter, solver.param.max_iter, status)
    return status
