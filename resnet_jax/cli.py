"""The command line (train.py, resnet-jax, python -m resnet_jax): its flags (resnet_jax.flags),
then a run, a sweep or an evaluation, ending in one line and an exit status."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from resnet_jax import process
from resnet_jax.errors import Interrupted, UserError, say
from resnet_jax.flags import build_parser, config_from_args, parse, parse_grid, parse_seeds, parse_shard
from resnet_jax.runs import sweeps


def program_name(argv0: str | None = None) -> str:
    """How the user called the command line: train.py, resnet-jax, or python -m resnet_jax."""
    base = os.path.basename(sys.argv[0] if argv0 is None else argv0)
    return "python -m resnet_jax" if base == "__main__.py" else (base or "resnet-jax")


@contextlib.contextmanager
def _quiet_libraries():
    """The console is the command line's: no start-up notices from TensorFlow, no logged
    tracebacks from orbax (absl) or asyncio, which resnet_jax says in one line. Put back when
    `main` returns (a caller in the same process, such as the tests, keeps its settings)."""
    import logging

    env = {"TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS")}
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TensorFlow only reads files here
    # orbax reports a failed background write (a full disk) through absl's logger with its
    # traceback; a damaged checkpoint leaves asyncio tasks whose errors are logged when collected.
    levels = {name: logging.getLogger(name).level for name in ("absl", "asyncio")}
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv=None) -> int:
    """train.py: exit status 0, 2 (bad input), 3 (a fault of the machine) or 130 (stopped, saved).

    What it sets up for its own process (quiet libraries, SIGTERM and SIGINT saving the run) is
    put back when it returns, so a caller in the same process (the tests) can call it again; the
    process-wide settings of resnet_jax.tuning.setup are made once, first."""
    with _quiet_libraries():
        return _main(argv)


def _main(argv) -> int:
    parser = build_parser(prog=program_name())
    args = parse(parser, argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.cache is not None:
        return _caches(args.cache)
    many = args.seeds is not None or args.sweep is not None
    if args.which is not None and not (args.eval_only or args.export):
        parser.error("--which applies only with --eval_only or --export")
    if args.export and args.eval_only:
        parser.error("--export and --eval_only are two jobs; pass one")
    if args.quiet and args.verbose:
        parser.error("--quiet and --verbose contradict each other; pass one")
    if args.seeds is not None and any(a == "--seed" or a.startswith("--seed=") for a in argv):
        parser.error("--seeds and --seed contradict each other; pass one")
    if many and args.eval_only:
        parser.error(
            "--eval_only evaluates one run: pass --workdir WORKDIR/seed_<s> without --seeds or --sweep"
        )
    if args.shard is not None and not many:
        parser.error("--shard splits the runs of --seeds or --sweep; pass one of them")
    if args.workers != "auto" and not many:
        parser.error("--workers trains the runs of --seeds or --sweep at once; pass one of them")
    verbosity = 0 if args.quiet else (2 if args.verbose is None else args.verbose)
    stop = threading.Event()
    try:
        config = config_from_args(args)
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        grid = parse_grid(args.sweep or ())
        sweeps.settings(config, grid)  # every setting's value checked before anything starts
        shard = parse_shard(args.shard)
        # Before JAX starts its backends (and before orbax's threads): devices, malloc, cache.
        process.setup(cpu_devices=args.cpu_devices, compilation_cache=args.compilation_cache)
        if args.distributed or args.coordinator_address or args.num_processes or args.process_id is not None:
            from resnet_jax.device import distributed

            distributed.initialize(
                args.coordinator_address, args.num_processes, args.process_id, args.init_timeout
            )
        if args.eval_only:
            return _evaluate(args)
        if args.export:
            return _export(args)
        from resnet_jax.runs import interrupt, loop

        run = dict(verbosity=verbosity, stop=stop, summary=args.summary)
        bar = verbosity >= 2 and sys.stdout.isatty()
        with interrupt.saving_on(stop, (signal.SIGINT, signal.SIGTERM), end_bar=bar):
            if not many:
                loop.train_and_evaluate(config, args.workdir, **run)
            else:
                worker = [sys.executable, "-m", "resnet_jax", *_without_workers(argv)]
                args_ = (
                    config,
                    args.workdir,
                    grid,
                    seeds,
                    None,
                    shard,
                    verbosity,
                    stop,
                    {"summary": args.summary},
                )
                sweeps._sweep(*args_, states=False, workers=args.workers, argv=worker)
        return 0
    except UserError as e:  # bad input (2), or a fault of the machine: disk or memory (3)
        say("error: " + " ".join(line.strip() for line in str(e).splitlines()))
        return getattr(e, "exit_status", 2)
    except Interrupted as e:
        say(f"stopped {e.where}; state saved in {e.path}. Run the same command to resume.")
        return 130


def _without_workers(argv) -> list:
    """The command line's arguments but --workers (a worker runs the same command, --workers 1)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def _caches(what: str) -> int:
    """--cache: where resnet_jax's caches are and how large (or, with clear, remove them)."""
    found = process.caches()
    if what == "clear":
        freed = process.clear_caches()
        print(f"Cleared resnet_jax's caches in {found['folder']}: {process.megabytes(freed)} freed")
        return 0
    print(f"resnet_jax's caches in {found['folder']}:")
    for what, label in (("images", "decoded images"), ("compiled", "compiled programs")):
        entry = found[what]
        size = process.megabytes(entry["bytes"])
        print(f"  {label:<17} {size:>10} in {entry['files']:,} files ({entry['path']})")
    print(
        f"Remove them with {program_name()} --cache clear (a run decodes and compiles again what it needs)."
    )
    return 0


def _export(args) -> int:
    """--export: the workdir's checkpoint for serving, in one line."""
    from resnet_jax.runs import export

    record = export.export(args.workdir, args.export, args.which or "best", args.export_format)
    where, source = os.path.abspath(args.export), record["source"]
    shape = "x".join(str(d) for d in record["input"]["shape"][1:])
    size, classes = process.megabytes(record["bytes"]), record["output"]["shape"][1]
    print(
        f"Exported the {source['checkpoint']} checkpoint of {source['workdir']} (epoch {source['epoch']}, "
        f"step {source['step']}) to {where}: {record['file']} + model.json, {size}, "
        f"{args.export_format}; uint8 N x {shape} -> {classes} probabilities"
    )
    return 0


def _evaluate(args) -> int:
    """--eval_only: a saved run's best (or latest) checkpoint on its test set, printed by process 0."""
    from resnet_jax.runs import evaluation
    from resnet_jax.runs.writer import Writer

    said = Writer(args.workdir, 0 if args.quiet else 1).console
    loss, acc = evaluation.evaluate_checkpoint(
        args.workdir, args.which or "best", data_dir=args.data_dir, console=said
    )
    Writer(args.workdir, 1).console.test_result(loss, acc)
    return 0
