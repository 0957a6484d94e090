"""Command line: train the article's Titanic model and explain every test passenger.

    python -m engine.attribute --all [--data FILE] [--out results/] [--epochs 20]
        [--n-steps 50] [--method gausslegendre] [--seed 404] [--device auto]
        [--baselines mean,random,zero,one]

Exit status: 0 on success, 2 for bad input or usage, 1 for a failure while running,
130 when interrupted. Nothing is written to ``--out`` unless the whole job succeeds.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from engine.baselines import BASELINE_KINDS, make_baselines
from engine.core import integrated_gradients
from engine.errors import EngineError, ModelError
from engine.io import OutputDir, tidy_attributions, tidy_deltas
from engine.quadrature import METHODS, check_method

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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
    baselines: tuple[str, ...] = BASELINE_KINDS


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
    parser.add_argument("--out", type=Path, default=Path("results"),
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
    parser.add_argument("--baselines", default="mean,random,zero,one",
                        help="comma-separated baselines to explain against, from mean, "
                             "random, zero and one (default: all four)")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and debug logs")
    return parser.parse_args(argv)


def job_config(args: argparse.Namespace) -> JobConfig:
    if not args.all:
        raise UsageError("nothing to do: pass --all to train and explain the Titanic test set")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    check_method(args.method, args.n_steps)
    baselines = _baseline_kinds(args.baselines)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return JobConfig(
        data=args.data, out=args.out, epochs=args.epochs, n_steps=args.n_steps,
        method=args.method, seed=args.seed, device=device, layer_order=args.layer_order,
        baselines=baselines,
    )


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


def run_all(config: JobConfig) -> dict[str, object]:
    """The worked example end to end; returns the summary the CLI prints."""
    from sklearn.metrics import classification_report

    from engine.data import load_titanic, locate_titanic_csv, prepare_titanic
    from engine.model import predict_proba, save_weights, train_titanic
    from engine.plots import attribution_heatmap
    from engine.validate import compare_with_captum

    outputs = OutputDir(config.out)
    with outputs:
        source = locate_titanic_csv(config.data)
        data = prepare_titanic(load_titanic(source), source=source)
        _say(f"data: {source} ({len(data.labels)} passengers, "
             f"{len(data.train_index)} train, {len(data.test_index)} test)")

        _say(f"training {config.epochs} epochs on {config.device} (seed {config.seed})")
        classifier = train_titanic(
            data, epochs=config.epochs, seed=config.seed, layer_order=config.layer_order,
            accelerator="gpu" if config.device == "cuda" else "cpu",
        )
        net = classifier.net.to(config.device).eval()
        survived = predict_proba(net, data.test_features.to(config.device)).cpu() >= 0.5
        truth = data.test_labels.cpu().numpy().astype(int)
        report = classification_report(truth, survived.numpy().astype(int), digits=3)
        accuracy = float((survived.numpy().astype(int) == truth).mean())

        inputs = data.test_features.to(config.device)
        baselines = make_baselines(config.baselines, data.mean_baseline, seed=config.seed)
        baselines = baselines.to(config.device)
        _say(f"explaining {inputs.shape[0]} rows x {len(config.baselines)} baselines x "
             f"{config.n_steps} steps in one batched pass")
        started = time.perf_counter()
        attributions, delta = integrated_gradients(
            net, inputs, baselines, n_steps=config.n_steps, method=config.method,
            return_convergence_delta=True,
        )
        engine_seconds = time.perf_counter() - started

        _say("validating against Captum's IntegratedGradients")
        validation = compare_with_captum(
            net, inputs, baselines, attributions, engine_seconds,
            n_steps=config.n_steps, method=config.method,
        )
        if validation.max_rel_error > 1e-5:
            raise ModelError(
                f"engine and Captum disagree: max relative error {validation.max_rel_error:.2e} "
                "exceeds 1e-5"
            )

        ids = data.test_passenger_ids
        outputs.write_csv("interpretation_results.csv", tidy_attributions(
            attributions, ids, config.baselines, data.feature_names))
        outputs.write_csv("convergence.csv", tidy_deltas(delta, ids, config.baselines))
        outputs.write_json("validation.json", {
            **validation.as_dict(), "max_abs_delta": float(delta.abs().max()),
            "accuracy": accuracy, "layer_order": config.layer_order, "seed": config.seed,
        })
        outputs.write_text("classification_report.txt", report)
        save_weights(net.cpu(), outputs.file("model.pt"))

        mean_attribution = attributions.mean(dim=1).cpu().numpy()  # (baselines, features)
        top_features = {}
        for kind, means in zip(config.baselines, mean_attribution):
            attribution_heatmap(
                means, data.feature_names, outputs.file(f"heatmap_{kind}.png"),
                title=f"Mean attribution, {kind}, epoch {config.epochs}",
            )
            top_features[kind] = data.feature_names[int(abs(means).argmax())]

        outputs.commit()

    return {
        "accuracy": accuracy,
        "classification_report": report,
        "top_features": top_features,
        "validation": validation,
        "max_abs_delta": float(delta.abs().max()),
        "out": config.out,
    }


def _one_line(error: Exception, *, debug: bool) -> str:
    """The first line of the message; an unexpected error also names its type."""
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if isinstance(error, EngineError):
        return text
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if debug else f"{text} (run with --debug for the traceback)"


@contextmanager
def _noticed_interrupts() -> Iterator[list[int]]:
    """Record each SIGINT (and raise KeyboardInterrupt as usual) while the job runs.

    Yields the list of signals received; the handler in place before is restored after.
    """
    received: list[int] = []
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored or threading.current_thread() is not threading.main_thread():
        # Only the main thread may set handlers; an ignored SIGINT stays ignored.
        yield received
        return

    def note_and_raise(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, note_and_raise)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_summary(summary: dict[str, object]) -> None:
    validation = summary["validation"]
    print(summary["classification_report"])
    print(f"accuracy on the test set: {summary['accuracy']:.3f}")
    for kind, feature in summary["top_features"].items():
        print(f"top feature ({kind}): {feature}")
    print(f"max relative error vs Captum: {validation.max_rel_error:.2e} "
          f"(max |delta| {summary['max_abs_delta']:.2e})")
    print(f"engine {validation.engine_seconds * 1e3:.1f} ms vs Captum "
          f"{validation.captum_seconds * 1e3:.1f} ms ({validation.speedup:.1f}x)")
    print(f"results in {summary['out']}/")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        with _noticed_interrupts() as interrupts:
            summary = run_all(job_config(args))
    except KeyboardInterrupt:
        print("interrupted: no results were written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        # Lightning turns Ctrl-C during fit into sys.exit(1); the status should still
        # say "interrupted". Any other exit is passed on.
        if not interrupts:
            raise
        print("interrupted: no results were written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - every failure becomes one line and a status
        if args.debug:
            traceback.print_exc()
        print(f"error: {_one_line(error, debug=args.debug)}", file=sys.stderr)
        usage = isinstance(error, EngineError) and not isinstance(error, ModelError)
        return EXIT_USAGE if usage else EXIT_FAILURE
    try:
        print_summary(summary)
    except KeyboardInterrupt:
        print(f"interrupted: the results in {summary['out']} are complete", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
