"""Command line: train the article's Titanic model and explain every test passenger.

    python -m engine.attribute --all [--data FILE] [--out results/] [--epochs 20]
        [--n-steps 50] [--method gausslegendre] [--seed 404] [--device auto]
        [--explain-row 6] [--flip Sex] [--baselines mean,random,zero,one]

Explain any CSV with the Titanic columns with a saved model, on one or many devices:

    python -m engine.attribute --data FILE --checkpoint model.pt [--devices N]
        [--strategy ddp] [--num-nodes M] [--format parquet|csv] [--chunk-rows 1024]

Exit status: 0 on success, 2 for bad input or usage, 1 for a failure while running,
130 when interrupted. Nothing is written to ``--out`` unless the whole job succeeds.
"""
# ruff: noqa: E402 - torch and the engine are imported after the start-up Ctrl-C handler

from __future__ import annotations

import signal
import sys

# The exit status of main() once the job's results are in place: a Ctrl-C that reaches
# the start-up handler after that keeps it, silently.
_outcome: list[int] = []


def _interrupted_while_starting(signum: int, frame: object) -> NoReturn:
    if _outcome:
        raise SystemExit(_outcome[0])
    # Runs while the imports below are still loading: nothing defined after it here.
    try:
        print("interrupted: no results were written", file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):  # a closed terminal or stream
        pass
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    # Importing torch and Lightning takes seconds: a Ctrl-C (or SIGTERM, SIGHUP) then is
    # one line, not an import traceback or a silent end. A signal the command inherited
    # as ignored stays ignored, as during the job. main() installs its own handlers for
    # the job itself.
    for _name in ("SIGINT", "SIGTERM", "SIGHUP"):
        _signum = getattr(signal, _name, None)
        if _signum is not None and signal.getsignal(_signum) is not signal.SIG_IGN:
            signal.signal(_signum, _interrupted_while_starting)

# After the handler: even the standard library's modules take some tens of milliseconds.
import argparse
import atexit
import contextlib
import dataclasses
import gc
import logging
import os
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

if __name__ == "__main__":
    # A mistyped flag, a value out of range or a missing first input file ends here,
    # before torch and Lightning load, with the message the run would give after them.
    from engine.arguments import early_error

    _early = early_error(sys.argv[1:])
    if _early is not None:
        print(f"error: {_early}", file=sys.stderr)
        raise SystemExit(2)

import torch

from engine.arguments import (
    EXIT_USAGE,
    CheckpointConfig,
    JobConfig,
    UsageError,
    parse_args,
)
from engine.arguments import checkpoint_config as _checkpoint_flags
from engine.arguments import escaped_breaks as _escaped_breaks
from engine.arguments import job_config as _job_flags
from engine.baselines import BASELINE_KINDS, make_baselines
from engine.core import integrated_gradients
from engine.errors import EngineError, ModelError
from engine.io import (
    OutputDir,
    WriteError,
    check_output_folder,
    counted,
    exclusive_use,
    published_folders,
    readable_path,
    refuse_folders_where_files_go,
    refuse_overwriting_inputs,
    stops_watched,
    tidy_attributions,
    tidy_deltas,
)
from engine.memory import keep_freed_memory

EXIT_OK, EXIT_FAILURE, EXIT_INTERRUPTED = 0, 1, 130
# Signals that stop an --all run like Ctrl-C does (the exit status is 128 + the signal).
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP")
                      if hasattr(signal, name))


def _interrupted_status(received: list[int]) -> int:
    """128 + the first signal received, as a shell reports a process it stopped."""
    return 128 + int(received[0]) if received else EXIT_INTERRUPTED


def job_config(args: argparse.Namespace) -> JobConfig:
    """The --all job the flags ask for, on the device they name or the one there is."""
    config = _job_flags(args)
    _check_cuda(args)
    if config.device == "auto":
        config = dataclasses.replace(config,
                                     device="cuda" if torch.cuda.is_available() else "cpu")
    return config


def _check_cuda(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible")


def run_all(config: JobConfig) -> dict[str, object]:
    """The worked example end to end; returns the summary the CLI prints."""
    # The run freezes training's objects for its timed calls (see below); called on its
    # own, with nothing frozen before, it unfreezes them again at the end.
    outermost = gc.get_freeze_count() == 0
    try:
        return _run_all(config)
    finally:
        if outermost:
            gc.unfreeze()


def _run_all(config: JobConfig) -> dict[str, object]:
    from sklearn.metrics import classification_report

    from engine.callbacks import AttributionCallback
    from engine.data import load_titanic, locate_titanic_csv, prepare_titanic
    from engine.model import predict_proba, save_weights, train_titanic
    from engine.report import TitanicReport, explain_flipped, render_report
    from engine.validate import compare_with_captum, synchronize

    # A --data file named on the command line is looked for first, as the command does
    # before torch loads (engine.arguments.early_error), so that both name the same mistake.
    if config.data is not None:
        locate_titanic_csv(config.data)
    # One run at a time into --out, of either kind (see run_checkpoint); the folder is
    # checked for what it holds once this run holds it.
    check_output_folder(config.out)
    with exclusive_use(config.out), OutputDir(config.out) as outputs:
        source = locate_titanic_csv(config.data)
        outputs.inputs["--data"] = source
        refuse_overwriting_inputs(config.out, all_run_files(config.baselines), outputs.inputs)
        refuse_folders_where_files_go(config.out, all_run_files(config.baselines))
        frame = load_titanic(source)
        data = prepare_titanic(frame, source=source)
        _check_passenger_flags(config, len(data.test_index), data.feature_names, source)
        _say(f"data: {source} ({counted(len(data.labels), 'passenger')}, "
             f"{len(data.train_index)} train, {len(data.test_index)} test)")

        ids = data.test_passenger_ids
        baselines = make_baselines(config.baselines, data.mean_baseline, seed=config.seed)
        # The test set against every baseline, before training and after each epoch.
        by_epoch = AttributionCallback(
            data.test_features, baselines, config.baselines, data.feature_names,
            row_ids=ids, n_steps=config.n_steps, method=config.method,
            every_n_epochs=config.snapshot_every, compile=config.compile,
        )
        cadence = ("every epoch" if config.snapshot_every == 1
                   else f"every {config.snapshot_every} epochs")
        _say(f"training {counted(config.epochs, 'epoch')} on {config.device} "
             f"(seed {config.seed}), explaining the test set {cadence}")
        classifier = train_titanic(
            data, epochs=config.epochs, seed=config.seed, layer_order=config.layer_order,
            accelerator="gpu" if config.device == "cuda" else "cpu", callbacks=[by_epoch],
        )
        net = classifier.net.to(config.device).eval()
        survived = predict_proba(net, data.test_features.to(config.device)).cpu() >= 0.5
        truth = data.test_labels.cpu().numpy().astype(int)
        report = classification_report(
            truth, survived.numpy().astype(int), digits=3, zero_division=0
        )
        accuracy = float((survived.numpy().astype(int) == truth).mean())

        inputs = data.test_features.to(config.device)
        baselines = baselines.to(config.device)
        _say(f"explaining {counted(inputs.shape[0], 'row')} x "
             f"{counted(len(config.baselines), 'baseline')} x "
             f"{counted(config.n_steps, 'step')} in one batched pass")
        # Training's objects join the imported ones main() froze: a full garbage
        # collection over them (about 0.1 s) landed in one timed call or the other,
        # mostly Captum's, which allocates more Python objects.
        gc.freeze()
        # The trained network is another module than the one the callback traced (and
        # compiled): a first call traces it (and compiles), so that the timed call below
        # measures the attribution itself, as Captum's call does.
        started = time.perf_counter()
        integrated_gradients(net, inputs, baselines, n_steps=config.n_steps,
                             method=config.method, compile=config.compile)
        synchronize(inputs.device)
        if config.compile:
            _say(f"compiled the engine's chunks in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        attributions, delta = integrated_gradients(
            net, inputs, baselines, n_steps=config.n_steps, method=config.method,
            return_convergence_delta=True, compile=config.compile,
        )
        synchronize(inputs.device)  # CUDA runs asynchronously: time the work, not the launch
        engine_seconds = time.perf_counter() - started

        _say("validating against Captum's IntegratedGradients")
        recomputed: dict[str, torch.Tensor] = {}

        def in_float64(model: torch.nn.Module, inputs: torch.Tensor,
                       baselines: torch.Tensor) -> torch.Tensor:
            try:
                recomputed["attributions"], recomputed["delta"] = integrated_gradients(
                    model, inputs, baselines, n_steps=config.n_steps, method=config.method,
                    return_convergence_delta=True,
                )
            except Exception as error:  # noqa: BLE001 - said once, with what was running
                raise ModelError(
                    "computing the attributions again in float64 (the engine's float32 "
                    "result was too far from float64 Captum) failed: "
                    f"{_one_line(error, debug=True)}"
                ) from error
            return recomputed["attributions"]

        validation = compare_with_captum(
            net, inputs, baselines, attributions, engine_seconds,
            n_steps=config.n_steps, method=config.method, recompute=in_float64,
        )
        if not validation.passed:
            detail = "" if validation.engine_vs_float64 is None else (
                f" (against Captum in float64: engine {validation.engine_vs_float64:.2e}, "
                f"Captum {validation.captum_vs_float64:.2e}"
                + (f", the engine in float64 {validation.recomputed_vs_float64:.2e}"
                   if validation.recomputed else
                   f"; {validation.pairs_off} of {validation.n_rows * validation.n_baselines}"
                   f" row-baseline pairs off, more than the {validation.kink_pairs} a "
                   "kink's rounding explains") + ")")
            raise ModelError(
                f"engine and Captum disagree: max relative error {validation.max_rel_error:.2e} "
                f"exceeds {validation.tolerance_text}{detail}"
            )
        if validation.recomputed:
            # A path point within rounding of a kink took the other slope in the engine's
            # float32 run: keep the float64 attributions, which float64 Captum confirms.
            attributions = recomputed["attributions"].to(attributions.dtype)
            delta = recomputed["delta"]
            _say(f"the engine's float32 result is {validation.engine_vs_float64:.2e} from "
                 "float64 Captum (a path point within rounding of a kink took the other "
                 "slope): its attributions were computed again in float64, "
                 f"{validation.recomputed_vs_float64:.2e} from float64 Captum, and those "
                 "are written")
        elif validation.engine_vs_float64 is not None:
            _say(f"Captum's float32 result is {validation.captum_vs_float64:.2e} from float64 "
                 f"Captum, the engine's {validation.engine_vs_float64:.2e}: the "
                 f"{validation.max_rel_error:.2e} between them is Captum's rounding")

        passenger = explain_flipped(
            net, inputs, baselines, data.feature_names, row=config.explain_row,
            feature=config.flip, passenger_ids=ids, n_steps=config.n_steps,
            method=config.method,
            # Over the whole file, as scaling saw it: a single-valued column has none.
            spread=(data.features.amax(dim=0) - data.features.amin(dim=0)).tolist(),
            **_passenger_in_file(frame, data.test_index[config.explain_row], data.feature_names),
        )

        outputs.write_csv("interpretation_results.csv", tidy_attributions(
            attributions, ids, config.baselines, data.feature_names))
        outputs.write_csv("convergence.csv", tidy_deltas(delta, ids, config.baselines))
        outputs.write_csv("attribution_by_epoch.csv", by_epoch.table())
        outputs.write_json("validation.json", {
            **validation.as_dict(), "max_abs_delta": float(delta.abs().max()),
            "accuracy": accuracy, "layer_order": config.layer_order, "seed": config.seed,
        })
        outputs.write_text("classification_report.txt", report)
        save_weights(net.cpu(), outputs.file("model.pt"))

        _say("drawing the heatmaps, the animation over epochs and the passenger comparison")
        mean_attribution = attributions.mean(dim=1).cpu().numpy()  # (baselines, features)
        top_features = {
            kind: data.feature_names[int(abs(means).argmax())]
            for kind, means in zip(config.baselines, mean_attribution)
        }
        pictures = _draw_pictures(outputs, mean_attribution, by_epoch, passenger,
                                  data.feature_names, config.epochs, kinds=config.baselines)
        outputs.write_text("report.html", render_report(TitanicReport(
            source=readable_path(source), n_passengers=len(data.labels),
            n_train=len(data.train_index), n_test=len(data.test_index),
            feature_names=tuple(data.feature_names),
            baseline_names=config.baselines, epochs=config.epochs, seed=config.seed,
            layer_order=config.layer_order, device=config.device, n_steps=config.n_steps,
            method=config.method, accuracy=accuracy, classification_report=report,
            top_features=top_features, epoch_costs=by_epoch.costs, passenger=passenger,
            validation=validation, max_abs_delta=float(delta.abs().max()), **pictures,
        )))

        outputs.commit()

    return {
        "accuracy": accuracy,
        "classification_report": report,
        "top_features": top_features,
        "validation": validation,
        "max_abs_delta": float(delta.abs().max()),
        "epoch_costs": by_epoch.costs,
        "passenger": passenger,
        "out": config.out,
    }


def all_run_files(kinds: Sequence[str]) -> tuple[str, ...]:
    """The files an --all run with baselines ``kinds`` writes into --out."""
    return ("interpretation_results.csv", "convergence.csv", "attribution_by_epoch.csv",
            "validation.json", "classification_report.txt", "model.pt",
            *(f"heatmap_{kind}.png" for kind in kinds), "heatmap_baselines.png",
            "heatmap_by_epoch.gif", "passenger_comparison.png", "report.html")


def _draw_pictures(outputs, mean_attribution, by_epoch, passenger, feature_names, epochs,
                   kinds=BASELINE_KINDS):
    """Write every picture into the staging folder; return their paths by report field."""
    from engine.plots import (
        attribution_gif,
        attribution_heatmap,
        baseline_comparison,
        passenger_comparison,
    )

    heatmaps = {}
    for kind, means in zip(kinds, mean_attribution):
        heatmaps[kind] = outputs.file(f"heatmap_{kind}.png")
        attribution_heatmap(means, feature_names, heatmaps[kind],
                            title=f"Mean attribution, {kind}, epoch {epochs}")

    side_by_side = outputs.file("heatmap_baselines.png")
    baseline_comparison(mean_attribution, kinds, feature_names, side_by_side,
                        title=f"Mean attribution per baseline, epoch {epochs}")

    animation = outputs.file("heatmap_by_epoch.gif")
    attribution_gif(by_epoch.mean_attributions(), by_epoch.epochs, kinds,
                    feature_names, animation)

    passenger_figure = outputs.file("passenger_comparison.png")
    passenger_comparison(
        passenger.attributions, passenger.probabilities, passenger.labels(), kinds,
        feature_names, passenger_figure, title=passenger.title(),
    )
    return {"heatmaps": heatmaps, "side_by_side": side_by_side, "animation": animation,
            "passenger_figure": passenger_figure}


def _check_passenger_flags(
    config: JobConfig, n_test: int, feature_names: Sequence[str], source: Path
) -> None:
    """Refuse a bad --explain-row or --flip before training rather than after."""
    if not 0 <= config.explain_row < n_test:
        raise UsageError(
            f"--explain-row {config.explain_row}: expected a test row from 0 to {n_test - 1} "
            f"(the last 20% of {source} holds {counted(n_test, 'passenger')})"
        )
    if config.flip not in feature_names:
        raise UsageError(f"--flip {config.flip}: expected one of {', '.join(feature_names)}")


def _passenger_in_file(frame, position: int, feature_names: Sequence[str]) -> dict[str, object]:
    """The passenger's name and feature values as the CSV has them, for the report."""
    record = frame.iloc[int(position)]
    name = record.get("Name")
    raw = [_as_in_file(record[feature]) for feature in feature_names]
    return {"name": None if name is None or name != name else str(name), "raw": raw}


def _as_in_file(value: object) -> str:
    if isinstance(value, float):
        # Up to 15 digits: a float prints as the file wrote it (512.3292, not 512.329).
        return "blank (median used)" if value != value else f"{value:.15g}"
    return str(value)


def _one_line(error: Exception, *, debug: bool) -> str:
    """The engine's message, or the first line of an unexpected error's with its type.

    The engine's messages, and a failed write's, are one line, but may quote a path or a
    value with a line break in it: the break is shown escaped, rather than cutting the
    message short.
    """
    if isinstance(error, (EngineError, WriteError)):
        return _escaped_breaks(str(error).strip())
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else ""
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if debug else f"{text} (run with --debug for the traceback)"


@contextlib.contextmanager
def _noticed_interrupts(
    *extra: signal.Signals, defer: Callable[[int], bool] | None = None,
    received: list[int] | None = None,
) -> Iterator[list[int]]:
    """Record each SIGINT, and each of the ``extra`` signals, and raise KeyboardInterrupt
    while the job runs, so that its staged results are dropped on the way out; a signal
    for which ``defer(signum)`` is true is only recorded (the job stops at a point of its
    choosing).

    Yields the list of signals received (``received``, when given, which then holds a
    signal that came while the handlers were being set); the handlers in place before
    are restored after. A signal that is ignored stays ignored.
    """
    received = [] if received is None else received
    if threading.current_thread() is not threading.main_thread():
        # Only the main thread may set handlers.
        yield received
        return

    stops: list[int] = []  # the signals acted on: no results are committed after one

    def note_and_raise(signum: int, frame: object) -> None:
        received.append(signum)
        if defer is not None and defer(signum):
            return
        stops.append(signum)
        raise KeyboardInterrupt

    previous = {}
    try:
        with stops_watched(stops):
            for signum in (signal.SIGINT, *extra):
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    previous[signum] = signal.signal(signum, note_and_raise)
            yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _say_once(message: str) -> None:
    """Print ``message`` to stderr from the first process of this machine only.

    Under DDP every process of a stopped run gets the signal and ends the same way; one
    line is enough. Lightning's launcher numbers the others in ``LOCAL_RANK``.
    """
    if os.environ.get("LOCAL_RANK", "0") in ("", "0"):
        _say(message)


def _say(message: str) -> None:
    """Print ``message`` to stderr, if it can still be written: a terminal closed under
    the run (whose SIGHUP this may report) fails the write, which must not change the
    run's exit status."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def print_summary(summary: dict[str, object]) -> None:
    validation = summary["validation"]
    print(summary["classification_report"])
    print(f"accuracy on the test set: {summary['accuracy']:.3f}")
    for kind, feature in summary["top_features"].items():
        print(f"top feature ({kind}): {feature}")
    print(f"max relative error vs Captum: {validation.max_rel_error:.2e} "
          f"(max |delta| {summary['max_abs_delta']:.2e})")
    if validation.recomputed:
        print(f"attributions written: computed again in float64, "
              f"{validation.recomputed_vs_float64:.2e} from float64 Captum")
    print(f"engine {validation.engine_seconds * 1e3:.1f} ms vs Captum "
          f"{validation.captum_seconds * 1e3:.1f} ms ({validation.speedup:.1f}x)")
    costs = summary.get("epoch_costs")
    if costs:
        per_epoch = statistics.median(cost.attribution_seconds for cost in costs)
        print(f"attribution during training: {counted(len(costs), 'snapshot')}, median "
              f"{per_epoch * 1e3:.1f} ms each")
    passenger = summary.get("passenger")
    if passenger is not None:
        before, after = passenger.probabilities
        print(f"passenger {passenger.passenger_id} (test row {passenger.row}): survival "
              f"{before:.2f} as is, {after:.2f} with {passenger.feature} {passenger.change}"
              + ("" if passenger.reason is None else f" ({passenger.reason})"))
    print(f"results in {_escaped_breaks(str(summary['out']))}/ (open report.html)")


# ---------------------------------------------------------------------------
# --checkpoint: explain any Titanic-shaped CSV with a saved model, over Lightning



def checkpoint_config(args: argparse.Namespace) -> CheckpointConfig:
    """The --checkpoint job the flags ask for, with CUDA there if they name it."""
    config = _checkpoint_flags(args)
    _check_cuda(args)
    return config


def run_checkpoint(config: CheckpointConfig) -> dict[str, object]:
    """Explain every row of ``config.data`` with a saved model; resumes an interrupted run.

    Every process Lightning starts runs this; only rank 0's summary is printed.
    """
    from engine.data import load_titanic, locate_titanic_csv
    from engine.distributed import (
        TABLES,
        AttributionJob,
        FeatureScaling,
        explain_rows,
    )
    from engine.model import load_weights_with_sha256

    # The digest names the weights loaded, not whatever the path holds by the time it is read.
    net, checkpoint_sha256 = load_weights_with_sha256(config.checkpoint)
    # The model saw features scaled by its training file: a new file gets the same scaling.
    reference = locate_titanic_csv(config.reference, flag="--reference")
    # What the folder holds first (checked again once the lock is held), then the inputs.
    check_output_folder(config.out, "checkpoint")
    refuse_overwriting_inputs(
        config.out, [f"{table}.{config.output_format}" for table in TABLES],
        {"--data": config.data, "--reference": reference, "--checkpoint": config.checkpoint},
    )
    scaling = FeatureScaling.from_reference(load_titanic(reference))
    job = AttributionJob(
        data=config.data, out=config.out, n_steps=config.n_steps, method=config.method,
        seed=config.seed, scaling=scaling, checkpoint_sha256=checkpoint_sha256,
        output_format=config.output_format, chunk_rows=config.chunk_rows,
        accelerator=config.accelerator, devices=config.devices, strategy=config.strategy,
        num_nodes=config.num_nodes,
    )
    # Two runs into one --out would share its chunk folder, and the first to finish
    # removes it under the other (an --all run takes the same lock).
    check_output_folder(config.out)
    with exclusive_use(config.out):
        summary = explain_rows(job, net)
    return {**summary, "reference": reference, "n_steps": config.n_steps, "out": config.out}


def print_checkpoint_summary(summary: dict[str, object]) -> None:
    if not summary["is_global_zero"]:
        return
    rate = summary["n_rows"] * summary["computed"] / max(summary["n_chunks"], 1)
    rate /= max(summary["seconds"], 1e-9)
    print(f"scaled like {_escaped_breaks(str(summary['reference']))} (medians fill blanks, "
          "min/max scale)")
    print(f"explained {counted(summary['n_rows'], 'row')} x "
          f"{counted(len(BASELINE_KINDS), 'baseline')} x "
          f"{counted(summary['n_steps'], 'step')} in {summary['world_size']} process(es)")
    # Nothing computed (every chunk reused) has no rate to show.
    speed = f" ({rate:.3g} rows/s)" if summary["computed"] else ""
    print(f"chunks: {summary['n_chunks']} in all, {summary['reused']} reused from an earlier "
          f"run, {summary['computed']} computed in {summary['seconds']:.2f} s{speed}")
    for path in summary["files"]:
        print(f"wrote {_escaped_breaks(str(path))}")


def main(argv: Sequence[str] | None = None) -> int:
    _outcome.clear()
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # A command-line run owns its process: let malloc reuse the chunks' freed memory.
    keep_freed_memory()
    # The libraries imported by now (torch, Lightning, pandas, matplotlib, numba) hold
    # objects that live as long as the process. Each full pass of the garbage collector
    # walked them all again, about 0.2 s landing inside whatever was running (once, the
    # timed Captum call: 385 ms instead of 200); frozen, a pass sees what the run made.
    # A caller that froze objects itself keeps them (and these) frozen.
    outermost = gc.get_freeze_count() == 0
    gc.freeze()
    try:
        return _run(args)
    finally:
        if outermost:
            gc.unfreeze()


def _defer_sigterm(signum: int) -> bool:
    """Whether a --checkpoint run lets the chunk in progress finish before it stops."""
    # The module may be in sys.modules half imported (the signal came during its import,
    # before defer_stop exists): nothing is being computed then, so the run stops at once.
    defer_stop = getattr(sys.modules.get("engine.distributed"), "defer_stop", None)
    return signum == signal.SIGTERM and defer_stop is not None and defer_stop()


def _stopped_by_sigterm(error: Exception) -> bool:
    from engine.distributed import StoppedBySignal

    return isinstance(error, StoppedBySignal)


def _run(args: argparse.Namespace) -> int:
    # A --checkpoint run keeps its finished chunks; --all writes nothing until the end.
    interrupted = (
        "interrupted: the chunks that had finished, if any, are kept; run the same command "
        "again to resume"
        if args.checkpoint is not None else "interrupted: no results were written"
    )
    # --all drops its staged results on SIGTERM and SIGHUP (a scheduler's stop, a closed
    # terminal) as on Ctrl-C. A --checkpoint run stops at once on SIGHUP, keeping its
    # finished chunks; on SIGTERM it finishes the chunk in progress first, and stops at
    # once before or after the chunks (while it writes the tables, for one).
    defer = None
    if args.checkpoint is not None:
        defer = _defer_sigterm
    interrupts: list[int] = []
    published_before = len(published_folders())
    try:
        with _noticed_interrupts(*_STOP_SIGNALS, defer=defer, received=interrupts):
            if args.checkpoint is not None:
                summary = run_checkpoint(checkpoint_config(args))
            else:
                summary = run_all(job_config(args))
    except KeyboardInterrupt:
        if Path(args.out) in published_folders()[published_before:]:
            # The stop came once the results were in place, while the run wound down.
            interrupted = _complete(args.out)
        _say_once(interrupted)
        return _interrupted_status(interrupts)
    except SystemExit:
        # Lightning turns Ctrl-C during fit into sys.exit(1); the status should still
        # say "interrupted". Any other exit is passed on.
        if not interrupts:
            raise
        _say_once(interrupted)
        return _interrupted_status(interrupts)
    except Exception as error:  # noqa: BLE001 - every failure becomes one line and a status
        if _stopped_by_sigterm(error):
            # A --checkpoint run asked to stop: like any interrupted run, not a failure.
            _say_once(f"interrupted: {error}")
            return 128 + int(signal.SIGTERM)
        if args.debug:
            traceback.print_exc()
        print(f"error: {_one_line(error, debug=args.debug)}", file=sys.stderr)
        usage = isinstance(error, EngineError) and not isinstance(error, ModelError)
        return EXIT_USAGE if usage else EXIT_FAILURE
    # The results are in place: from here on a Ctrl-C that reaches the start-up handler
    # (see _interrupted_while_starting) keeps the status, silently.
    _outcome[:] = [EXIT_OK]
    after: list[int] = []
    try:
        # The handlers from before the job are back; a stop while a slow terminal takes
        # the summary must still say that the results are complete.
        with _noticed_interrupts(*_STOP_SIGNALS, received=after):
            if args.checkpoint is not None:
                print_checkpoint_summary(summary)
            else:
                print_summary(summary)
    except KeyboardInterrupt:
        _outcome[:] = [_interrupted_status(after)]
        _say_once(_complete(summary["out"]))
        return _outcome[0]
    return EXIT_OK


def _complete(out: object) -> str:
    return f"interrupted: the results in {_escaped_breaks(str(out))} are complete"


def finish_quietly(status: int) -> None:
    """From now on a stop signal ends the process at once with ``status``, saying nothing.

    For after the run: its results are in place (or its failure said), and the
    interpreter's shutdown (about a second with torch and Lightning loaded) is all that
    is left. A Ctrl-C there printed "no results were written" beside complete results,
    and a SIGTERM turned a finished run's status into 143.
    """
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # a closed descriptor leaves None
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    for number in (signal.SIGINT, *_STOP_SIGNALS):
        if signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, lambda signum, frame: os._exit(status))
    # The interpreter's shutdown puts Python handlers back to the default (the signal
    # ends the process) once the exit functions have run; ignored signals it leaves
    # ignored. Registered last, this runs first among them.
    atexit.register(_ignore_stop_signals)


def _ignore_stop_signals() -> None:
    for number in (signal.SIGINT, *_STOP_SIGNALS):
        signal.signal(number, signal.SIG_IGN)


if __name__ == "__main__":
    exit_status = main()
    _outcome[:] = [exit_status]
    finish_quietly(exit_status)
    sys.exit(exit_status)
