"""The command line's flags, and the checks of them that need neither torch nor the data.

``python -m engine.attribute`` runs these before it imports torch and Lightning (seconds):
a mistyped flag, a value out of range or an input file that does not exist then ends at
once, in the same one line and with the same status as it would after the imports.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from engine.baselines import BASELINE_KINDS
from engine.errors import ArgumentError, EngineError
from engine.quadrature import METHODS, check_method

EXIT_USAGE = 2

# Far past where any rule stops improving; beyond it the quadrature nodes alone need
# gigabytes, and the run would fail late instead of now.
MAX_STEPS = 100_000


class UsageError(EngineError, ValueError):
    """The command line asks for something impossible."""


@dataclass(frozen=True)
class JobConfig:
    data: Path | None
    out: Path
    epochs: int
    n_steps: int
    method: str
    seed: int
    device: str
    layer_order: str
    explain_row: int = 6
    flip: str = "Sex"
    baselines: tuple[str, ...] = BASELINE_KINDS
    snapshot_every: int = 1
    compile: bool = False


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end in one line on stderr and status 2, not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(
        prog="python -m engine.attribute",
        description="Integrated Gradients for every Titanic test passenger in one pass.",
    )
    parser.add_argument("--all", action="store_true",
                        help="train, explain the test set against four baselines, validate "
                             "against Captum and write tables and pictures")
    parser.add_argument("--data", type=Path, help="Kaggle Titanic train.csv (default: "
                        "data/train.csv, then the cache, then a download)")
    # Kept as typed until checked: Path("") would read as ".".
    parser.add_argument("--out", default="results",
                        help="folder for the results (default: results/)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    parser.add_argument("--n-steps", type=int, default=50,
                        help="quadrature nodes per path (default 50)")
    parser.add_argument("--method", default="gausslegendre",
                        help=f"quadrature rule: {', '.join(METHODS)} (default gausslegendre)")
    parser.add_argument("--seed", type=int, default=404, help="seed for training and the "
                        "random baseline (default 404, the article's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to train and attribute (default: cuda if available)")
    parser.add_argument("--layer-order", default="article", choices=("article", "conventional"),
                        help="the article's layer call order or the textbook one")
    parser.add_argument("--explain-row", type=int, default=6, metavar="N",
                        help="test row for the passenger comparison (default 6)")
    parser.add_argument("--flip", default="Sex", metavar="FEATURE",
                        help="feature flipped (v -> 1 - v) in the passenger comparison "
                             "(default Sex: male <-> female)")
    parser.add_argument("--baselines", default="mean,random,zero,one",
                        help="comma-separated baselines to explain against, from mean, "
                             "random, zero and one (default: all four)")
    parser.add_argument("--snapshot-every", type=int, default=1, metavar="N",
                        help="explain the test set after every N-th epoch during training "
                             "(default 1: every epoch; the last epoch always)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the engine's chunks: compiles once (seconds); "
                             "on a CPU the Titanic job's calls are then slower, not faster "
                             "(see README: Speed)")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and debug logs")
    _add_checkpoint_flags(parser)
    args = parser.parse_args(argv)
    # Which flags were changed from their defaults: each job refuses the other's.
    args.changed = {dest for dest, value in vars(args).items()
                    if value != parser.get_default(dest)}
    if "baselines" in args.changed and _same_kinds(args.baselines,
                                                   parser.get_default("baselines")):
        args.changed.discard("baselines")  # the default, spelled another way
    return args


def _same_kinds(given: str, default: str) -> bool:
    """Whether ``given`` names the default baselines in their order, spelled another way
    (long names, spaces): a --checkpoint run writes that order, and would ignore another."""
    try:
        return _baseline_kinds(given) == _baseline_kinds(default)
    except UsageError:
        return False


# Flags only one of the two jobs reads; the other refuses them rather than ignoring them.
TRAINING_FLAGS = ("epochs", "layer_order", "explain_row", "flip", "baselines", "snapshot_every",
                  "compile")
CHECKPOINT_FLAGS = ("reference", "devices", "strategy", "num_nodes", "output_format",
                    "chunk_rows")


def _refuse_flags(args: argparse.Namespace, names: Sequence[str], reason: str) -> None:
    for name in names:
        if name in getattr(args, "changed", ()):
            flag = "--format" if name == "output_format" else f"--{name.replace('_', '-')}"
            raise UsageError(f"{flag} does not apply to {reason}")


def job_config(args: argparse.Namespace) -> JobConfig:
    """The --all job the flags ask for; its ``device`` as typed ("auto" unresolved)."""
    if not args.all:
        raise UsageError("nothing to do: pass --all to train and explain the Titanic test set, "
                         "or --data FILE --checkpoint model.pt to explain a file")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    if args.snapshot_every < 1:
        raise UsageError(f"--snapshot-every must be at least 1, got {args.snapshot_every}")
    _refuse_flags(args, CHECKPOINT_FLAGS, "--all: it is for explaining a file with "
                  "--checkpoint")
    _check_shared_flags(args)
    baselines = _baseline_kinds(args.baselines)
    return JobConfig(
        data=args.data, out=args.out, epochs=args.epochs, n_steps=args.n_steps,
        method=args.method, seed=args.seed, device=args.device, layer_order=args.layer_order,
        explain_row=args.explain_row, flip=args.flip, baselines=baselines,
        snapshot_every=args.snapshot_every, compile=args.compile,
    )


def _check_shared_flags(args: argparse.Namespace) -> None:
    """Flags both jobs read, checked before any work so that a typo costs nothing."""
    if args.n_steps > MAX_STEPS:
        raise UsageError(f"--n-steps {args.n_steps} is more than the {MAX_STEPS:,} allowed")
    try:
        check_method(args.method, args.n_steps)
    except ArgumentError as error:
        # The library names its arguments; the user typed flags.
        text = str(error).replace("n_steps=", "--n-steps ").replace("method ", "--method ", 1)
        raise UsageError(text) from error
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in 0..{2**32 - 1}, got {args.seed}")
    if not str(args.out).strip() or Path(args.out) == Path(".") \
            or _holds_current_folder(Path(args.out)):
        raise UsageError(f"--out {str(args.out)!r}: name a results folder, not the current "
                         "one or a folder above it")
    args.out = Path(args.out)


def _holds_current_folder(out: Path) -> bool:
    """Whether ``out`` is the current folder or one above it (``..``, ``/``): results
    would land among the folders that hold the user's work."""
    try:
        return Path.cwd().resolve().is_relative_to(out.resolve())
    except (OSError, RuntimeError):  # a name too long, a symlink loop: not the same
        return False


def _baseline_kinds(text: str) -> tuple[str, ...]:
    """``"mean,zero"`` -> ``("mean-base", "zero-base")``; the long names are accepted too."""
    kinds: list[str] = []
    for name in (part.strip() for part in text.split(",")):
        kind = name if name.endswith("-base") else f"{name}-base"
        if kind not in BASELINE_KINDS:
            raise UsageError(
                f"--baselines: unknown baseline {name!r}, expected a comma-separated list "
                "of mean, random, zero, one"
            )
        if kind in kinds:
            raise UsageError(f"--baselines: {name!r} is listed twice")
        kinds.append(kind)
    return tuple(kinds)



@dataclass(frozen=True)
class CheckpointConfig:
    data: Path
    checkpoint: Path
    reference: Path | None
    out: Path
    n_steps: int
    method: str
    seed: int
    accelerator: str
    devices: int
    strategy: str
    num_nodes: int
    output_format: str
    chunk_rows: int


def _add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "explaining a file with a saved model (--data FILE --checkpoint model.pt)")
    group.add_argument("--checkpoint", type=Path, metavar="PATH",
                       help="weights saved by --all (model.pt), engine.model.save_weights "
                            "or a Lightning checkpoint of TitanicClassifier: explain every "
                            "row of --data")
    group.add_argument("--reference", type=Path, metavar="FILE",
                       help="the file the model was trained on; its medians and min/max "
                            "prepare --data (default: the file --all would use)")
    group.add_argument("--devices", type=int, default=1, metavar="N",
                       help="processes per node, one per device (default 1)")
    group.add_argument("--strategy", default="auto", metavar="NAME",
                       help="Lightning strategy, e.g. ddp or ddp_spawn (default auto)")
    group.add_argument("--num-nodes", type=int, default=1, metavar="M", help="machines (default 1)")
    group.add_argument("--format", dest="output_format", default="csv",
                       choices=("csv", "parquet"), help="table format (default csv)")
    group.add_argument("--chunk-rows", type=int, default=1024, metavar="N",
                       help="rows per chunk, the unit a resumed run skips (default 1024)")


def checkpoint_config(args: argparse.Namespace) -> CheckpointConfig:
    """The --checkpoint job the flags ask for; whether CUDA is there is not checked."""
    if args.all:
        raise UsageError("--all and --checkpoint do not go together: --all trains its own model")
    if args.data is None:
        raise UsageError("--checkpoint needs --data FILE: the CSV of rows to explain")
    if args.layer_order != "article":
        raise UsageError("--layer-order does not apply to --checkpoint: the file stores it")
    if "baselines" in args.changed:
        # Said apart: the default order, spelled another way, is let through (_same_kinds).
        raise UsageError("--baselines does not apply to --checkpoint: it explains against "
                         "all four baselines, in the order mean,random,zero,one")
    _refuse_flags(args, TRAINING_FLAGS, "--checkpoint: it is for training with --all")
    for flag, value in (("--devices", args.devices), ("--num-nodes", args.num_nodes),
                        ("--chunk-rows", args.chunk_rows)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    _check_shared_flags(args)
    accelerator = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}[args.device]
    return CheckpointConfig(
        data=args.data, checkpoint=args.checkpoint, reference=args.reference, out=args.out,
        n_steps=args.n_steps, method=args.method, seed=args.seed, accelerator=accelerator,
        devices=args.devices, strategy=args.strategy, num_nodes=args.num_nodes,
        output_format=args.output_format, chunk_rows=args.chunk_rows,
    )


def escaped_breaks(text: str) -> str:
    """``text`` on one line: a line break in it (in a path, say) is shown as ``\\n``."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def early_error(argv: Sequence[str]) -> str | None:
    """The one-line message the command would end with, found before torch loads, or None
    when the run has to go on to find out.

    Covers what the run checks first, in its order: the flags, then (unless --device cuda
    asks the run to look for a GPU first) the first input file it reads, when that does
    not exist: --checkpoint for a --checkpoint run, --data for --all. Anything the run
    reads after that input (--out, --reference, the rows of a --checkpoint run) could
    fail there first, so a missing file among them is left to the run. With --debug
    nothing is decided here, so that the run shows its traceback; argparse's own
    mistakes and --help end inside, as they do in the run.
    """
    args = parse_args(argv)
    if args.debug:
        return None
    try:
        if args.checkpoint is not None:
            checkpoint_config(args)
            first, kind = args.checkpoint, "checkpoint file"
        else:
            job_config(args)
            first, kind = args.data, "file"
    except UsageError as error:
        return escaped_breaks(str(error).strip())
    if args.device != "cuda" and first is not None and _missing(first, kind):
        return escaped_breaks(f"{first}: no such {kind}")
    return None


def _missing(path: Path, kind: str) -> bool:
    """Whether the run would call ``path`` missing: engine.data names only a file that is
    not there; engine.model also a path through a file (a "folder" that is a file)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    except NotADirectoryError:
        return kind == "checkpoint file"
    except (OSError, ValueError):  # unreadable, a NUL in the name: the run names it
        return False
    return False
