"""Command line: train the article's Titanic model and explain every test passenger.

    python -m engine.attribute --all [--data FILE] [--out results/] [--epochs 20]
        [--n-steps 50] [--method gausslegendre] [--seed 404] [--device auto]

Explain any CSV with the Titanic columns with a saved model, on one or many devices:

    python -m engine.attribute --data FILE --checkpoint model.pt [--devices N]
        [--strategy ddp] [--num-nodes M] [--format parquet|csv] [--chunk-rows 1024]

Exit status: 0 on success, 2 for bad input or usage, 1 for a failure while running,
130 when interrupted. Nothing is written to ``--out`` unless the whole job succeeds.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
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
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and debug logs")
    _add_checkpoint_flags(parser)
    return parser.parse_args(argv)


def job_config(args: argparse.Namespace) -> JobConfig:
    if not args.all:
        raise UsageError("nothing to do: pass --all to train and explain the Titanic test set, "
                         "or --data FILE --checkpoint model.pt to explain a file")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    check_method(args.method, args.n_steps)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return JobConfig(
        data=args.data, out=args.out, epochs=args.epochs, n_steps=args.n_steps,
        method=args.method, seed=args.seed, device=device, layer_order=args.layer_order,
    )


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
        baselines = make_baselines(BASELINE_KINDS, data.mean_baseline, seed=config.seed)
        baselines = baselines.to(config.device)
        _say(f"explaining {inputs.shape[0]} rows x {len(BASELINE_KINDS)} baselines x "
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
        outputs.write_csv("interpretation_results.csv",
                          tidy_attributions(attributions, ids, BASELINE_KINDS, data.feature_names))
        outputs.write_csv("convergence.csv", tidy_deltas(delta, ids, BASELINE_KINDS))
        outputs.write_json("validation.json", {
            **validation.as_dict(), "max_abs_delta": float(delta.abs().max()),
            "accuracy": accuracy, "layer_order": config.layer_order, "seed": config.seed,
        })
        outputs.write_text("classification_report.txt", report)
        save_weights(net.cpu(), outputs.file("model.pt"))

        mean_attribution = attributions.mean(dim=1).cpu().numpy()  # (baselines, features)
        top_features = {}
        for kind, means in zip(BASELINE_KINDS, mean_attribution):
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


# ---------------------------------------------------------------------------
# --checkpoint: explain any Titanic-shaped CSV with a saved model, over Lightning


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
    group.add_argument("--checkpoint", type=Path,
                       help="weights saved by --all (model.pt): explain every row of --data")
    group.add_argument("--reference", type=Path,
                       help="the file the model was trained on; its medians and min/max "
                            "prepare --data (default: the file --all would use)")
    group.add_argument("--devices", type=int, default=1,
                       help="processes per node, one per device (default 1)")
    group.add_argument("--strategy", default="auto",
                       help="Lightning strategy, e.g. ddp or ddp_spawn (default auto)")
    group.add_argument("--num-nodes", type=int, default=1, help="machines (default 1)")
    group.add_argument("--format", dest="output_format", default="csv",
                       choices=("csv", "parquet"), help="table format (default csv)")
    group.add_argument("--chunk-rows", type=int, default=1024,
                       help="rows per chunk, the unit a resumed run skips (default 1024)")


def checkpoint_config(args: argparse.Namespace) -> CheckpointConfig:
    if args.all:
        raise UsageError("--all and --checkpoint do not go together: --all trains its own model")
    if args.data is None:
        raise UsageError("--checkpoint needs --data FILE: the CSV of rows to explain")
    if args.layer_order != "article":
        raise UsageError("--layer-order does not apply to --checkpoint: the file stores it")
    for flag, value in (("--devices", args.devices), ("--num-nodes", args.num_nodes),
                        ("--chunk-rows", args.chunk_rows)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    check_method(args.method, args.n_steps)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible")
    accelerator = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}[args.device]
    return CheckpointConfig(
        data=args.data, checkpoint=args.checkpoint, reference=args.reference, out=args.out,
        n_steps=args.n_steps, method=args.method, seed=args.seed, accelerator=accelerator,
        devices=args.devices, strategy=args.strategy, num_nodes=args.num_nodes,
        output_format=args.output_format, chunk_rows=args.chunk_rows,
    )


def run_checkpoint(config: CheckpointConfig) -> dict[str, object]:
    """Explain every row of ``config.data`` with a saved model; resumes an interrupted run.

    Every process Lightning starts runs this; only rank 0's summary is printed.
    """
    from engine.data import load_titanic, locate_titanic_csv
    from engine.distributed import AttributionJob, FeatureScaling, explain_rows, file_sha256
    from engine.model import load_weights

    net = load_weights(config.checkpoint)
    # The model saw features scaled by its training file: a new file gets the same scaling.
    reference = locate_titanic_csv(config.reference)
    scaling = FeatureScaling.from_reference(load_titanic(reference))
    job = AttributionJob(
        data=config.data, out=config.out, n_steps=config.n_steps, method=config.method,
        seed=config.seed, scaling=scaling, checkpoint_sha256=file_sha256(config.checkpoint),
        output_format=config.output_format, chunk_rows=config.chunk_rows,
        accelerator=config.accelerator, devices=config.devices, strategy=config.strategy,
        num_nodes=config.num_nodes,
    )
    summary = explain_rows(job, net)
    return {**summary, "reference": reference, "n_steps": config.n_steps, "out": config.out}


def print_checkpoint_summary(summary: dict[str, object]) -> None:
    if not summary["is_global_zero"]:
        return
    rate = summary["n_rows"] * summary["computed"] / max(summary["n_chunks"], 1)
    rate /= max(summary["seconds"], 1e-9)
    print(f"scaled like {summary['reference']} (medians fill blanks, min/max scale)")
    print(f"explained {summary['n_rows']} rows x {len(BASELINE_KINDS)} baselines x "
          f"{summary['n_steps']} steps in {summary['world_size']} process(es)")
    print(f"chunks: {summary['n_chunks']} in all, {summary['reused']} reused from an earlier "
          f"run, {summary['computed']} computed in {summary['seconds']:.2f} s "
          f"({rate:.0f} rows/s)")
    for path in summary["files"]:
        print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.checkpoint is not None:
            summary = run_checkpoint(checkpoint_config(args))
        else:
            summary = run_all(job_config(args))
    except KeyboardInterrupt:
        print("interrupted: no results were written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - every failure becomes one line and a status
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        usage = isinstance(error, EngineError) and not isinstance(error, ModelError)
        return EXIT_USAGE if usage else EXIT_FAILURE
    if args.checkpoint is not None:
        print_checkpoint_summary(summary)
    else:
        print_summary(summary)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
