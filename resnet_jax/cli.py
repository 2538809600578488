"""The command line, generated from Config: one flag per field, spelled like the field."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import signal
import sys
import threading
import typing

from resnet_jax import __version__, many, tuning
from resnet_jax.config import NAMES, Config, preset
from resnet_jax.errors import Interrupted, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage too)
        self.exit(2, f"{self.prog}: error: {message}{self._did_you_mean(message)} (see --help)\n")

    def _did_you_mean(self, message: str) -> str:
        """'; did you mean --epochs?' for a misspelt flag (argparse's unrecognized arguments)."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        flags = [a.split("=")[0] for a in message.split(":", 1)[1].split() if a.startswith("--")]
        for flag in flags:
            close = difflib.get_close_matches(flag, list(self._option_string_actions), n=1, cutoff=0.7)
            if close:
                return f"; did you mean {close[0]}?"
        return ""


class _Help(argparse.HelpFormatter):
    """Adds `(default: X)` to a flag's help unless X is None or False or the help says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        if "default" in text:
            return text
        value = action.default
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        return f"{text} (default: {value})"


def comma_list(kind):
    """An argparse type: "26,36,46" -> (26, 36, 46) of `kind` (train.py's tuple flags)."""

    def parse(text: str):
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip() != "")
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__}s, got {text!r}"
            ) from None

    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


def program_name(argv0: str | None = None) -> str:
    """How the user called the command line: train.py, resnet-jax, or python -m resnet_jax."""
    base = os.path.basename(sys.argv[0] if argv0 is None else argv0)
    return "python -m resnet_jax" if base == "__main__.py" else (base or "resnet-jax")


def build_parser(add_help: bool = True, prog: str = "train.py") -> argparse.ArgumentParser:
    """train.py's flags; the benchmarks build theirs on it (benchmarks/common.py)."""
    parser = _Parser(
        prog=prog,
        description="Train the seed ResNet (resnet_jax); every flag "
        "is a field of resnet_jax.Config, defaults are the seed recipe.",
        formatter_class=_Help,
        allow_abbrev=False,
        add_help=add_help,
    )
    parser.add_argument("--workdir", default="ckpt", help="checkpoints, metrics.jsonl, curves.png")
    parser.add_argument("--version", action="version", version=f"resnet_jax {__version__}")
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        if field.name == "preset":  # set by --preset below, with its choices
            continue
        hint, flag = hints[field.name], f"--{field.name}"
        args = typing.get_args(hint)
        kw = dict(default=field.default, help=field.metadata["help"])
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(
                flag,
                type=comma_list(args[0]),
                **kw,
                metavar=",".join(str(v) for v in field.default) or "A,B",
            )
        elif type(None) in args:  # Optional[str]
            parser.add_argument(flag, type=args[0], **kw)
        else:
            parser.add_argument(flag, type=hint, **kw)
    parser.add_argument(
        "--eval_only",
        action="store_true",
        help="evaluate a saved checkpoint on the test set instead of training",
    )
    parser.add_argument(
        "--which",
        choices=("best", "latest"),
        default=None,
        help="checkpoint for --eval_only: best (the default) or latest",
    )
    parser.add_argument(
        "--preset",
        choices=NAMES,
        default="",
        metavar="NAME",
        help="start from a named recipe; flags given override its values. "
        f"Names: {', '.join(NAMES)} (resnet<depth>v<1|2>: the Keras example's table, "
        "200 epochs; seed: the defaults; tiny: 4 filters, blocks 1,1,1, 2 epochs)",
    )
    parser.add_argument(
        "--seeds",
        default=None,
        metavar="0,1,2|0-3",
        help="train these seeds of the recipe, each a complete run in WORKDIR/seed_<s>, then a "
        "summary (WORKDIR/summary.json, mean ± sd of the test accuracy); instead of --seed",
    )
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    parser.add_argument(
        "--summary",
        action="store_true",
        help="print a per-layer table of the model (as Keras's model.summary()) first",
    )
    multi = parser.add_argument_group("many hosts (jax.distributed; see README)")
    multi.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run; with no other flag JAX detects the cluster "
        "(SLURM, Open MPI, TPU, Kubernetes)",
    )
    multi.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    multi.add_argument("--num_processes", type=int, default=None, help="how many processes in all")
    multi.add_argument("--process_id", type=int, default=None, help="this process's number, 0..N-1")
    multi.add_argument(
        "--init_timeout", type=int, default=120, help="seconds to wait for all processes to join"
    )
    machine = parser.add_argument_group("this machine (resnet_jax.tuning, resnet_jax.cache)")
    machine.add_argument(
        "--compilation_cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep compiled train steps in the user's cache directory (resnet_jax.cache), so the next "
        "run of the same shapes starts without compiling; JAX_COMPILATION_CACHE_DIR picks the folder",
    )
    machine.add_argument(
        "--cpu_devices",
        default="auto",
        help="CPU only: JAX devices to split the CPU into (data parallel over cores); auto: one per "
        "core (a divisor of --batch_size) for models worth splitting, one device for small models "
        "(under 0.35 GFLOP a step's forward pass: the tiny preset), which run faster unsplit",
    )
    parser.add_argument(
        "--verbose",
        type=int,
        default=None,
        choices=(0, 1, 2),
        help="0 silent, 1 epoch lines, 2 (the default) plus a progress bar on terminals",
    )
    return parser


def config_from_args(args) -> Config:
    return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})


def _quiet_libraries():
    """The console is ours: no start-up chatter from TensorFlow / tfds, no logged tracebacks from orbax."""
    import logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    # orbax reports a failed background write (a full disk) through absl's logger, with its
    # traceback; resnet_jax says the same in one line.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    # A damaged checkpoint leaves asyncio tasks whose errors are logged when they are collected,
    # long after resnet_jax reported the damage in one line.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)


def parse(parser, argv=None):
    """The flags, on top of --preset's values when one is named (explicit flags win)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    for i, arg in enumerate(argv):  # the Config field was `version` before resnet_jax 0.3
        if arg.startswith("--version=") or (arg == "--version" and argv[i + 1 : i + 2] in (["1"], ["2"])):
            parser.error("--version prints resnet_jax's version; the ResNet version is --resnet_version N")
    known, _ = parser.parse_known_args(argv)
    if getattr(known, "preset", None):
        recipe = preset(known.preset)
        parser.set_defaults(**{f.name: getattr(recipe, f.name) for f in dataclasses.fields(Config)})
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """train.py: exit status 0, 2 (bad input), 3 (a fault of the machine) or 130 (stopped, saved).

    What it sets up for its own process (quiet libraries, the platform's settings, SIGTERM and
    SIGINT saving the run) stays here; the signal handlers are put back when it returns, so a
    caller in the same process (the tests) can call it again."""
    _quiet_libraries()
    parser = build_parser(prog=program_name())
    args = parse(parser, argv)
    if args.which is not None and not args.eval_only:
        parser.error("--which applies only with --eval_only")
    if args.quiet and args.verbose:
        parser.error("--quiet and --verbose contradict each other; pass one")
    argv = sys.argv[1:] if argv is None else argv
    if args.seeds is not None and any(a == "--seed" or a.startswith("--seed=") for a in argv):
        parser.error("--seeds and --seed contradict each other; pass one")
    if args.seeds is not None and args.eval_only:
        parser.error("--eval_only evaluates one run: pass --workdir WORKDIR/seed_<s> without --seeds")
    verbosity = 0 if args.quiet else (2 if args.verbose is None else args.verbose)
    stop = threading.Event()
    try:
        config = config_from_args(args)
        seeds = many.parse_seeds(args.seeds) if args.seeds is not None else None
        # Before JAX starts its backends (and before orbax's threads): devices, malloc, cache.
        tuning.configure(config, args.cpu_devices, compilation_cache=args.compilation_cache)
        if args.distributed or args.coordinator_address or args.num_processes or args.process_id is not None:
            from resnet_jax import distributed

            distributed.initialize(
                args.coordinator_address, args.num_processes, args.process_id, args.init_timeout
            )
        if args.eval_only:
            from resnet_jax import evaluation, report

            console = report.Console(0 if args.quiet else 1)
            loss, acc = evaluation.evaluate_checkpoint(
                args.workdir, args.which or "best", data_dir=args.data_dir, console=console
            )
            print(f"Test loss: {loss}")
            print(f"Test accuracy: {acc}")
            return 0
        from resnet_jax import interrupt, loop  # imports JAX: after the cheap checks

        run = dict(verbosity=verbosity, stop=stop, summary=args.summary)
        bar = verbosity >= 2 and sys.stdout.isatty()
        with interrupt.saving_on(stop, (signal.SIGINT, signal.SIGTERM), end_bar=bar):
            if seeds is None:
                loop.train_and_evaluate(config, args.workdir, **run)
            else:
                many.train_many(config, args.workdir, seeds, **run)
        return 0
    except UserError as e:  # bad input (2), or a fault of the machine: disk or memory (3)
        print("error: " + " ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)
        return getattr(e, "exit_status", 2)
    except Interrupted as e:
        print(f"stopped {e.where}; state saved in {e.path}. Run the same command to resume.", file=sys.stderr)
        return 130
