"""train.py's flags: one per Config field and one per field of `Flags` (the flags outside Config),
generated from the two records; the text of --seeds, --sweep and --shard read into values. A
field's text is read by config.parse_value, for its flag as for --sweep."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import typing

from resnet_jax import __version__
from resnet_jax.config import TUPLE_SEPARATOR, Config, parse_value
from resnet_jax.errors import UserError
from resnet_jax.presets import NAMES, preset
from resnet_jax.runs import sweeps


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
    """An argparse type: "26,36,46" -> (26, 36, 46) of `kind` (the benchmarks' list flags)."""

    def parse(text: str):
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip() != "")
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__}s, got {text!r}"
            ) from None

    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


def field_type(name: str):
    """An argparse type for the Config field `name`: config.parse_value, the one parser of a
    field's text (--sweep's too)."""

    def parse(text: str):
        try:
            return parse_value(name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


GROUPS = {
    "many": "many runs: seeds and sweeps (resnet_jax.sweeps; see README)",
    "hosts": "many hosts (jax.distributed; see README)",
    "machine": "this machine (resnet_jax.tuning, resnet_jax.cache)",
}


def _flag(default, help: str, group: str | None = None, **argparse_kw):
    """A flag of `Flags` with its --help, its group (GROUPS) and what argparse needs beyond the type."""
    return dataclasses.field(default=default, metadata=dict(help=help, group=group, kw=argparse_kw))


@dataclasses.dataclass(frozen=True)
class Flags:
    """train.py's flags that are not Config fields: where, what to do instead of training, many
    runs, what is printed, many hosts, this machine. Their parser is generated from this record,
    as the Config fields' is from Config."""

    workdir: str = _flag("ckpt", "checkpoints, metrics.jsonl, curves.png")
    preset: str = _flag(
        "",
        "start from a named recipe; flags given override its values. "
        f"Names: {', '.join(NAMES)} (resnet<depth>v<1|2>: the Keras example's table, "
        "200 epochs; seed: the defaults; tiny: 4 filters, blocks 1,1,1, 2 epochs)",
        choices=NAMES,
        metavar="NAME",
    )
    eval_only: bool = _flag(False, "evaluate a saved checkpoint on the test set instead of training")
    which: str | None = _flag(
        None,
        "checkpoint for --eval_only or --export: best (the default) or latest",
        choices=("best", "latest"),
    )
    export: str | None = _flag(
        None,
        "export the workdir's model to this folder for serving (raw uint8 images in, class "
        "probabilities out; preprocessing and weights inside) instead of training",
        metavar="PATH",
    )
    export_format: str = _flag(
        "jax",
        "--export's format: jax (jax.export, loads with jax alone) or saved_model (TensorFlow, for "
        "TF Serving)",
        choices=("jax", "saved_model"),
    )
    summary: bool = _flag(False, "print a per-layer table of the model (as Keras's model.summary()) first")
    quiet: bool = _flag(False, "print only errors and the result asked for (--eval_only's test accuracy)")
    verbose: int | None = _flag(
        None, "0 silent, 1 epoch lines, 2 (the default) plus a progress bar on terminals", choices=(0, 1, 2)
    )
    seeds: str | None = _flag(
        None,
        "train these seeds of the recipe (of each --sweep setting), each a complete run in "
        "WORKDIR/seed_<s> (WORKDIR/<setting>/seed_<s>), then a summary (WORKDIR/summary.json: "
        "mean ± sd of the test accuracy); instead of --seed",
        "many",
        metavar="0,1,2|0-3",
    )
    sweep: list | None = _flag(
        None,
        "train every value of a Config field (repeat the flag for a grid: the product of the "
        "values); a tuple value with ':' between items (stage_sizes=1:1:1,3:3:2). The summary "
        "compares each setting with the first (95 %% interval) and chooses one on validation",
        "many",
        action="append",
        metavar="FIELD=V1,V2",
    )
    workers: str = _flag(
        "auto",
        "runs of --seeds or --sweep trained at once, each in a process of its own sharing the machine "
        "(auto: the cores divided by those a run uses, e.g. 2 for the tiny preset on 2 cores, 1 for "
        "the seed model; 1: one after another)",
        "many",
        metavar="auto|N",
    )
    shard: str | None = _flag(
        None,
        "take the I-th of every N runs of the sweep (0-based): a static split for a job array "
        "whose shared disk does not honour file locks; slurm: SLURM_ARRAY_TASK_ID of "
        "SLURM_ARRAY_TASK_COUNT. Without it, processes sharing a sweep claim runs by their locks",
        "many",
        metavar="I/N|slurm",
    )
    distributed: bool = _flag(
        False,
        "join a multi-process run; with no other flag JAX detects the cluster "
        "(SLURM, Open MPI, TPU, Kubernetes)",
        "hosts",
    )
    coordinator_address: str | None = _flag(None, "host:port of process 0", "hosts")
    num_processes: int | None = _flag(None, "how many processes in all", "hosts")
    process_id: int | None = _flag(None, "this process's number, 0..N-1", "hosts")
    init_timeout: int = _flag(120, "seconds to wait for all processes to join", "hosts")
    cache: str | None = _flag(
        None,
        "show resnet_jax's caches (decoded images, compiled programs: where, how large) and exit; "
        "--cache clear removes them (runs decode and compile again what they need)",
        "machine",
        nargs="?",
        const="show",
        choices=("show", "clear"),
        metavar="show|clear",
    )
    compilation_cache: bool = _flag(
        True,
        "keep compiled train steps in the user's cache directory (resnet_jax.cache), so the next "
        "run of the same shapes starts without compiling; JAX_COMPILATION_CACHE_DIR picks the folder",
        "machine",
    )
    cpu_devices: str = _flag(
        "auto",
        "CPU only: JAX devices each run uses (data parallel over cores); auto: one per core (a "
        "divisor of --batch_size) for models worth splitting, one device for small models (under "
        "0.35 GFLOP a step's forward pass: the tiny preset), which run faster unsplit",
        "machine",
    )


def _add(parser, groups, name: str, hint, default, meta: dict, negatable: bool = False):
    """One flag, spelled like its field, its type from the annotation (`hint`); a bool flag is a
    switch (--x), or `negatable` (--x / --no-x: a Config field, or a default of True)."""
    target = groups.get(meta.get("group"), parser)
    kw = dict(default=default, help=meta["help"], **meta.get("kw", {}))
    flag = f"--{name}"
    if hint is bool:
        action = argparse.BooleanOptionalAction if default or negatable else "store_true"
        target.add_argument(flag, action=action, **kw)
    elif "action" in kw:
        target.add_argument(flag, **kw)
    else:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        target.add_argument(flag, type=args[0] if args else hint, **kw)


def build_parser(add_help: bool = True, prog: str = "train.py") -> argparse.ArgumentParser:
    """train.py's flags: one per Config field (its type from config.parse_value) and one per
    field of `Flags`; the benchmarks build theirs on it (benchmarks/common.py)."""
    parser = _Parser(
        prog=prog,
        description="Train the seed ResNet (resnet_jax); every flag "
        "is a field of resnet_jax.Config, defaults are the seed recipe.",
        formatter_class=_Help,
        allow_abbrev=False,
        add_help=add_help,
    )
    parser.add_argument("--version", action="version", version=f"resnet_jax {__version__}")
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        if field.name in FLAG_NAMES:  # preset: a flag with its choices
            continue
        kw = {}
        if hints[field.name] is not bool:
            kw = dict(kw=dict(type=field_type(field.name), action="store"))
            if typing.get_origin(hints[field.name]) is tuple:
                kw["kw"]["metavar"] = ",".join(str(v) for v in field.default) or "A,B"
        meta = {**field.metadata, **kw}
        _add(parser, {}, field.name, hints[field.name], field.default, meta, negatable=True)
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    hints = typing.get_type_hints(Flags)
    for field in dataclasses.fields(Flags):
        _add(parser, groups, field.name, hints[field.name], field.default, field.metadata)
    return parser


FLAG_NAMES = {f.name for f in dataclasses.fields(Flags)}


def config_from_args(args) -> Config:
    return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})


def parse_seeds(text: str) -> tuple[int, ...]:
    """ "0,1,2", "0-3" or "0-3,7" -> the seeds, in order; one line for anything else."""
    seeds = []
    for part in (p.strip() for p in str(text).split(",")):
        span = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if span and int(span[2]) >= int(span[1]):
            seeds += range(int(span[1]), int(span[2]) + 1)
        elif part:
            try:
                seeds.append(int(part))
            except ValueError:
                raise UserError(f"--seeds takes seeds like 0,1,2 or 0-3, got {text!r}") from None
    sweeps.check_seeds(seeds)
    return tuple(seeds)


def parse_grid(texts) -> tuple:
    """`--sweep FIELD=V1,V2` flags -> ((field, (values...)), ...), values as the field's flag
    reads them (tuples with ':' between items). One line for a flag that cannot be one."""
    fields = {f.name for f in dataclasses.fields(Config)}
    grid = []
    for text in texts:
        if "=" not in text:
            raise UserError(f"--sweep takes FIELD=V1,V2,..., got {text!r} (no '=')")
        name, values = (part.strip() for part in text.split("=", 1))
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=1)
            hint = f"; did you mean {close[0]}?" if close else " (train.py --help lists the fields)"
            raise UserError(f"--sweep {text}: {name!r} is not a setting{hint}")
        texts_of = [v.strip() for v in values.split(",")]
        if not values.strip() or "" in texts_of:
            raise UserError(f"--sweep {text}: give {name} one or more values, like {name}=V1,V2")
        is_tuple = typing.get_origin(typing.get_type_hints(Config)[name]) is tuple
        if is_tuple and TUPLE_SEPARATOR not in values and len(set(texts_of)) < len(texts_of):
            one = TUPLE_SEPARATOR.join(texts_of)
            raise UserError(
                f"--sweep {text}: a value of {name} has '{TUPLE_SEPARATOR}' between its items: "
                f"--sweep {name}={one} (several values: {one},3:3:2)"
            )
        try:
            parsed = tuple(parse_value(name, v, TUPLE_SEPARATOR) for v in texts_of)
        except ValueError as e:
            raise UserError(f"--sweep {text}: {e}") from None
        grid.append((name, parsed))
    return sweeps.check_grid(grid)


def parse_shard(text: str | None, environ=None):
    """--shard I/N, or slurm (SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT, from
    SLURM_ARRAY_TASK_MIN); None without it."""
    if text is None:
        return None
    environ = os.environ if environ is None else environ
    if text.strip().lower() == "slurm":
        try:
            task, count = int(environ["SLURM_ARRAY_TASK_ID"]), int(environ["SLURM_ARRAY_TASK_COUNT"])
            task -= int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        except (KeyError, ValueError):
            raise UserError(
                "--shard slurm needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (sbatch --array); "
                "outside a job array pass --shard I/N"
            ) from None
    else:
        found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not found:
            raise UserError(f"--shard takes I/N (this task's number, 0-based, of N), or slurm; got {text!r}")
        task, count = int(found[1]), int(found[2])
    if not 0 <= task < count:
        raise UserError(f"--shard {text}: the task number must be 0 to {count - 1} of {count}")
    return task, count


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
