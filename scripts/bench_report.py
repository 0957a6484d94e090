"""pytest-benchmark JSON -> a markdown table, a PNG plot and the targets met.

    python scripts/bench_report.py results/bench.json [more.json ...] [--out results/bench_report]

merges the files (a later file's result for the same contender and job wins), writes
``<out>.md`` and ``<out>.png`` and prints the markdown. Each row is one contender on one
job: best and median time; from the best round, path points per second, nominal GFLOP/s
(the plain path's forward and input-gradient FLOPs, so hoisted runs show a useful-work
rate), the fraction of the fp32 matmul peak measured on the same machine in the same run,
and the speed-up over the article's loop and over Captum's best call.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

CAPTUM = ("captum-per-baseline", "captum-one-call")
# (description, size, contender(s), baseline contender or None, threshold, kind). With
# several contenders the fastest one counts (the worst one for an error), and is named.
PLAIN = ("engine-plain-fp32", "engine-plain-bf16", "engine-plain-compiled",
         "engine-plain-compiled-bf16")
HOISTED = ("engine-fp32", "engine-bf16", "engine-compiled", "engine-compiled-bf16",
           "engine-affine-fp32", "engine-affine-compiled")
TARGETS = [
    ("Titanic job >= 150x the article loop (default engine: hoisted, eager fp32)",
     "titanic-179", "engine-fp32", "article-loop", 150, "speedup"),
    ("Titanic job >= 15x Captum's best call (default engine)", "titanic-179", "engine-fp32",
     "captum-best", 15, "speedup"),
    ("Titanic job >= 150x the article loop (plain path, fastest variant)", "titanic-179",
     PLAIN, "article-loop", 150, "speedup"),
    ("Titanic job >= 15x Captum's best call (plain path, fastest variant)", "titanic-179",
     PLAIN, "captum-best", 15, "speedup"),
    ("hoisted engine >= 1000x the article loop (fastest variant)", "titanic-179", HOISTED,
     "article-loop", 1000, "speedup"),
    ("hoisted engine >= 1000x the article loop (fastest variant, 20k rows)", "tiled-20k",
     HOISTED, "article-loop", 1000, "speedup"),
    # Hoisted runs do less arithmetic than the nominal FLOPs: only the plain path's rate is
    # a fraction of the peak.
    ("20k rows >= 60% of the fp32 matmul peak (plain path, fp32)", "tiled-20k",
     ("engine-plain-fp32", "engine-plain-compiled"), None, 0.6, "peak"),
    ("bf16 >= 1.7x fp32 (plain path, 20k rows, eager)", "tiled-20k", "engine-plain-bf16",
     "engine-plain-fp32", 1.7, "speedup"),
    ("bf16 >= 1.7x fp32 (plain path, 20k rows, compiled)", "tiled-20k",
     "engine-plain-compiled-bf16", "engine-plain-compiled", 1.7, "speedup"),
    ("bf16 relative error <= 1e-2 (20k rows, worst variant)", "tiled-20k",
     ("engine-plain-bf16", "engine-plain-compiled-bf16", "engine-bf16", "engine-compiled-bf16"),
     None, 1e-2, "error"),
]


class BadBenchmark(ValueError):
    """An entry of the JSON that the report cannot use, and why."""


def load(path: Path) -> tuple[list[dict], dict]:
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or not isinstance(document.get("benchmarks"), list):
        raise BadBenchmark("no list of benchmarks in it (not pytest-benchmark JSON)")
    machine_info = document.get("machine_info", {})
    if not isinstance(machine_info, dict):
        raise BadBenchmark(f"machine_info is a {type(machine_info).__name__}, not an object")
    rows = []
    for index, bench in enumerate(document["benchmarks"]):
        if not isinstance(bench, dict):
            raise BadBenchmark(f"benchmark {index} is a {type(bench).__name__}, not an object")
        info = bench.get("extra_info", {})
        if not isinstance(info, dict) or "contender" not in info:
            continue
        stats = bench.get("stats")
        if not isinstance(stats, dict):
            raise BadBenchmark(f"benchmark {index} ({info['contender']}) has no stats")
        median = info.get("engine_seconds", stats.get("median"))
        fastest = info.get("engine_seconds", stats.get("min"))
        # Rates and ratios use the fastest round: on a shared machine the slower rounds
        # measure the neighbours' load, not the code. The median is shown next to it.
        row = {**info, "seconds": fastest, "median_seconds": median}
        _check_row(row, index)
        rows.append(row)
    return rows, machine_info


def shared_peaks(rows: list[dict]) -> None:
    """Give every row its device's largest peak, across all the files read.

    The peak is measured again at every benchmark; the largest of the run is the
    reference for all of them (a low one only means the machine was slow then).
    """
    peaks: dict[str, float] = {}
    for row in rows:
        peaks[row["device"]] = max(peaks.get(row["device"], 0.0), row["matmul_peak_gflops"])
    for row in rows:
        row["matmul_peak_gflops"] = peaks[row["device"]]


# Fields every entry needs, and those that must be numbers above zero.
_TEXT_FIELDS = ("contender", "device", "size", "machine")
_POSITIVE_FIELDS = ("seconds", "median_seconds", "points", "rows", "matmul_peak_gflops")
# Largest value each number may take; times are also at least a nanosecond. Within these
# every rate and ratio the report prints is a finite float (1e300 s against 1e-300 s
# printed an infinite speed-up).
_LONGEST_SECONDS = 1e7
_SHORTEST_SECONDS = 1e-9
_LARGEST = {"points": 1e18, "rows": 1e18, "matmul_peak_gflops": 1e12, "flops": 1e30,
            "peak_rss_bytes": 1e18, "rel_error_vs_fp32": 1e6}
# Smallest value of the counts and rates that are divided by.
_SMALLEST = {"points": 1, "rows": 1, "matmul_peak_gflops": 1e-3}


def _check_row(row: dict, index: int) -> None:
    """Raise ``BadBenchmark`` naming the first field the report could not use."""
    name = f"benchmark {index} ({row.get('contender')})"
    for field in _TEXT_FIELDS:
        if not isinstance(row.get(field), str):
            raise BadBenchmark(f"{name}: {field} must be text, got {row.get(field)!r}")
    positive = [*_POSITIVE_FIELDS, *(["peak_rss_bytes"] if row["size"].startswith("scale")
                                     or "peak_rss_bytes" in row else [])]
    for field in positive:
        if not _number(row.get(field)) or not row[field] > 0:
            raise BadBenchmark(f"{name}: {field} must be a number above 0, "
                               f"got {row.get(field)!r}")
    if not _number(row.get("flops")) or not row["flops"] >= 0:
        raise BadBenchmark(f"{name}: flops must be a number >= 0, got {row.get('flops')!r}")
    for field in ("rel_error_vs_fp32", "first_call_seconds"):
        if field in row and not (_number(row[field]) and row[field] >= 0):
            raise BadBenchmark(f"{name}: {field} must be a number >= 0, got {row[field]!r}")
    for field in ("seconds", "median_seconds"):
        if not _SHORTEST_SECONDS <= row[field] <= _LONGEST_SECONDS:
            raise BadBenchmark(f"{name}: {field} must be between {_SHORTEST_SECONDS:g} and "
                               f"{_LONGEST_SECONDS:g}, got {row[field]!r}")
    if row.get("first_call_seconds", 0) > _LONGEST_SECONDS:
        raise BadBenchmark(f"{name}: first_call_seconds must be at most {_LONGEST_SECONDS:g}, "
                           f"got {row['first_call_seconds']!r}")
    for field, smallest in _SMALLEST.items():
        if row[field] < smallest:
            raise BadBenchmark(f"{name}: {field} must be at least {smallest:g}, "
                               f"got {row[field]!r}")
    for field, largest in _LARGEST.items():
        if field in row and row[field] > largest:
            raise BadBenchmark(f"{name}: {field} must be at most {largest:g}, "
                               f"got {row[field]!r}")


def _number(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def best_captum(rows: list[dict], device: str, size: str) -> float | None:
    times = [r["seconds"] for r in rows
             if r["device"] == device and r["size"] == size and r["contender"] in CAPTUM]
    return min(times) if times else None


def table(rows: list[dict]) -> str:
    lines = [
        "| device | job | contender | best time | median | points/s | GFLOP/s | of peak "
        "| vs article loop | vs Captum best | first call | notes |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    article = {(r["device"], r["size"]): r["seconds"] for r in rows
               if r["contender"] == "article-loop"}
    for r in sorted(rows, key=lambda r: (r["device"], r["size"], -r["seconds"])):
        gflops = r["flops"] / r["seconds"] / 1e9
        loop = article.get((r["device"], r["size"]))
        captum = best_captum(rows, r["device"], r["size"])
        notes = []
        if "rel_error_vs_fp32" in r:
            notes.append(f"rel. error {r['rel_error_vs_fp32']:.1e}")
        if "peak_rss_bytes" in r:
            notes.append(f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
        lines.append(
            f"| {r['device']} | {r['size']} | {r['contender']} | {_time(r['seconds'])} "
            f"| {_time(r['median_seconds'])} "
            f"| {r['points'] / r['seconds']:.3g} | {gflops:.1f} "
            f"| {gflops / r['matmul_peak_gflops']:.0%} "
            f"| {_ratio(loop, r['seconds'])} | {_ratio(captum, r['seconds'])} "
            f"| {_time(r['first_call_seconds']) if 'first_call_seconds' in r else ''} "
            f"| {', '.join(notes)} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict], device: str = "cpu") -> str:
    lines = ["| target | measured | met |", "| --- | --- | --- |"]
    for description, size, contenders, baseline, threshold, kind in TARGETS:
        measured = _target_value(rows, device, size, contenders, baseline, kind)
        if measured is None:
            lines.append(f"| {description} | not measured | - |")
            continue
        value, contender = measured
        met = value <= threshold if kind == "error" else value >= threshold
        shown = f"{value:.1e}" if kind == "error" else (
            f"{value:.0%}" if kind == "peak" else f"{value:.1f}x")
        if not isinstance(contenders, str):
            shown += f" ({contender})"
        lines.append(f"| {description} | {shown} | {'yes' if met else 'no'} |")
    lines.extend(_scale_lines([r for r in rows if r["device"] == device]))
    return "\n".join(lines)


def _target_value(rows, device, size, contenders, baseline, kind) -> tuple[float, str] | None:
    """The measured value and the contender it comes from, or None if not measured."""
    names = (contenders,) if isinstance(contenders, str) else contenders
    here = [r for r in rows if r["device"] == device and r["size"] == size]
    subjects = [r for r in here if r["contender"] in names]
    if kind == "error":
        errors = [(r["rel_error_vs_fp32"], r["contender"]) for r in subjects
                  if "rel_error_vs_fp32" in r]
        return max(errors) if errors else None
    if not subjects:
        return None
    subject = min(subjects, key=lambda r: r["seconds"])
    if kind == "peak":
        rate = subject["flops"] / subject["seconds"] / 1e9 / subject["matmul_peak_gflops"]
        return rate, subject["contender"]
    if baseline == "captum-best":
        reference = best_captum(rows, device, size)
    else:
        reference = next((r["seconds"] for r in here if r["contender"] == baseline), None)
    return None if reference is None else (reference / subject["seconds"], subject["contender"])


def _scale_lines(rows: list[dict]) -> list[str]:
    scale = sorted((r for r in rows if r["size"].startswith("scale")), key=lambda r: r["rows"])
    if not scale:
        return ["| 1M rows: peak RSS < 2 GiB, time linear in rows | not measured | - |"]
    lines = []
    largest = scale[-1]
    rss_ok = largest["peak_rss_bytes"] < 2 << 30
    lines.append(
        f"| {largest['rows']:,} rows: peak RSS < 2 GiB | "
        f"{largest['peak_rss_bytes'] / 2**30:.2f} GiB | {'yes' if rss_ok else 'no'} |"
    )
    if len(scale) > 1:
        per_row = [r["seconds"] / r["rows"] for r in scale]
        spread = max(per_row) / min(per_row)
        lines.append(
            f"| time linear in rows (time per row within 1.3x across sizes) | "
            f"{spread:.2f}x | {'yes' if spread <= 1.3 else 'no'} |"
        )
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if not r["size"].startswith("scale"):
            groups[f"{r['device']} {r['size']}"].append(r)
    figure, axes = plt.subplots(1, max(len(groups), 1), figsize=(6 * max(len(groups), 1), 4.5))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for axis, (name, members) in zip(axes, sorted(groups.items())):
        members = sorted(members, key=lambda r: r["seconds"])
        axis.barh([r["contender"] for r in members], [r["points"] / r["seconds"] for r in members])
        axis.set_xscale("log")
        axis.set_xlabel("path points per second (log)")
        axis.set_title(name)
    figure.tight_layout()
    _atomic(path, lambda target: figure.savefig(target, dpi=120, format="png"))
    plt.close(figure)


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        # mkstemp makes the file 0600; give it the mode a plain open() would have.
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(temporary, 0o666 & ~mask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _ratio(reference: float | None, seconds: float) -> str:
    return "" if reference is None else f"{reference / seconds:.1f}x"


def report(rows: list[dict], machine_info: dict) -> str:
    machines = sorted({f"{r['device']}: {r['machine']}" for r in rows})
    peaks = sorted({f"{r['device']}: {r['matmul_peak_gflops']:.0f} GFLOP/s"
                    for r in rows})
    # Scale rows come from subprocesses and do not record torch's version.
    torch_version = next((r["torch"] for r in rows if r.get("torch")), "?")
    header = [
        f"Machine: {'; '.join(machines)}. Python {machine_info.get('python_version', '?')}, "
        f"torch {torch_version}.",
        f"Measured fp32 matmul peak (2048^2, same run): {'; '.join(peaks)}.",
        "",
    ]
    sections = [table(rows)]
    # CPU first; the thresholds were set for a 2-core CPU and are judged on each device.
    for device in sorted({r["device"] for r in rows}, key=lambda d: (d != "cpu", d)):
        title = "Targets (CPU):" if device == "cpu" else (
            f"Targets ({device}; the thresholds were set for a 2-core CPU):")
        sections += ["", title, "", targets(rows, device)]
    return "\n".join(header + sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+",
                        help="pytest-benchmark's --benchmark-json output(s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="path without suffix for .md and .png (default: next to the JSON)")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    machine_info: dict = {}
    for path in args.json:
        if not path.is_file():
            print(f"error: {path}: no such benchmark JSON file", file=sys.stderr)
            return 2
        try:
            more, machine_info = load(path)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError,
                TypeError) as error:
            print(f"error: {path}: not pytest-benchmark JSON ({type(error).__name__})",
                  file=sys.stderr)
            return 2
        except OSError as error:
            print(f"error: {path}: unreadable ({error.strerror or error})", file=sys.stderr)
            return 2
        except BadBenchmark as error:
            print(f"error: {path}: {error}", file=sys.stderr)
            return 2
        rows.extend(more)
    # A later file's measurement of the same contender on the same job replaces an earlier.
    rows = list({(r["device"], r["size"], r["contender"]): r for r in rows}.values())
    if not rows:
        print(f"error: {args.json[0]}: no engine benchmarks in it", file=sys.stderr)
        return 2

    shared_peaks(rows)
    out = args.out or args.json[0].with_name(args.json[0].stem + "_report")
    if not out.parent.is_dir():
        print(f"error: --out {out}: {out.parent} is not a folder", file=sys.stderr)
        return 2
    text = report(rows, machine_info)
    _atomic(out.with_suffix(".md"), lambda target: Path(target).write_text(text))
    plot(rows, out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
