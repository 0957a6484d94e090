"""scripts/bench_report.py: the table and the targets from pytest-benchmark's JSON."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_report.py"


@pytest.fixture(scope="module")
def bench_report():
    spec = importlib.util.spec_from_file_location("bench_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry(contender: str, seconds: float, size: str = "titanic-179", **extra) -> dict:
    return {
        "stats": {"min": seconds, "median": seconds * 1.1},
        "extra_info": {
            "contender": contender, "device": "cpu", "size": size, "machine": "test cpu",
            "rows": 179, "baselines": 4, "points": 35_800, "flops": 2.0e9,
            "matmul_peak_gflops": 100.0, "torch": "2.13.0", **extra,
        },
    }


def write_json(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"machine_info": {"python_version": "3.11"},
                                "benchmarks": entries}))
    return path


def target_lines(text: str) -> dict[str, str]:
    lines = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("target", "---"):
            lines[cells[0]] = f"{cells[1]} | {cells[2]}"
    return lines


def test_targets_use_the_fastest_named_contender_and_the_worst_error(bench_report, tmp_path,
                                                                     capsys):
    entries = [
        entry("article-loop", 2.0),
        entry("captum-per-baseline", 0.2),
        entry("captum-one-call", 0.4),
        entry("engine-fp32", 0.010),
        entry("engine-compiled", 0.0018),
        entry("engine-plain-fp32", 0.030),
        entry("engine-plain-compiled-bf16", 0.012),
        entry("engine-plain-fp32", 2.0, size="tiled-20k", rel_error_vs_fp32=0.0),
        entry("engine-plain-compiled", 1.5, size="tiled-20k", rel_error_vs_fp32=1e-7),
        entry("engine-plain-bf16", 1.0, size="tiled-20k", rel_error_vs_fp32=9e-3),
        entry("engine-bf16", 0.5, size="tiled-20k", rel_error_vs_fp32=2e-2),
        entry("article-loop", 400.0, size="tiled-20k"),
        entry("engine-fp32", 0.4, size="tiled-20k", rel_error_vs_fp32=1e-7),
    ]
    # A benchmark that measured the peak in a slow moment: the run's best peak counts.
    entries[-5]["extra_info"]["matmul_peak_gflops"] = 40.0
    path = write_json(tmp_path / "bench.json", entries)

    assert bench_report.main([str(path), "--out", str(tmp_path / "report")]) == 0

    found = target_lines(capsys.readouterr().out)
    loop = "Titanic job >= 150x the article loop (default engine: hoisted, eager fp32)"
    assert found[loop] == "200.0x | yes"
    assert found["Titanic job >= 15x Captum's best call (default engine)"] == "20.0x | yes"
    plain = "Titanic job >= 15x Captum's best call (plain path, fastest variant)"
    assert found[plain] == "16.7x (engine-plain-compiled-bf16) | yes"
    hoisted = "hoisted engine >= 1000x the article loop (fastest variant)"
    assert found[hoisted] == "1111.1x (engine-compiled) | yes"
    # Each size against its own article loop (at 20k rows, 400 s).
    assert found[hoisted.replace("variant)", "variant, 20k rows)")] == "1000.0x (engine-fp32) | yes"
    # 2e9 FLOP in 1.5 s against a 100 GFLOP/s peak: 1%.
    peak = "20k rows >= 60% of the fp32 matmul peak (plain path, fp32)"
    assert found[peak] == "1% (engine-plain-compiled) | no"
    assert found["bf16 >= 1.7x fp32 (plain path, 20k rows, eager)"] == "2.0x | yes"
    assert found["bf16 >= 1.7x fp32 (plain path, 20k rows, compiled)"] == "not measured | -"
    error = "bf16 relative error <= 1e-2 (20k rows, worst variant)"
    assert found[error] == "2.0e-02 (engine-bf16) | no"
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.png").is_file()
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_file_without_engine_benchmarks_is_one_line_exit_two(bench_report, tmp_path, capsys):
    path = write_json(tmp_path / "empty.json", [])

    assert bench_report.main([str(path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_header_names_torch_even_when_a_scale_row_comes_first(bench_report, tmp_path,
                                                                  capsys):
    scale = entry("engine-fp32", 10.0, size="scale-1000k", peak_rss_bytes=2**30)
    del scale["extra_info"]["torch"]  # scale runs happen in subprocesses
    path = write_json(tmp_path / "bench.json", [scale, entry("engine-fp32", 0.01)])

    assert bench_report.main([str(path), "--out", str(tmp_path / "report")]) == 0

    assert "torch 2.13.0." in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda e: e["stats"].update(min=0.0), "seconds must be a number above 0, got 0.0"),
        (lambda e: e["stats"].update(min=float("nan")), "seconds must be a number above 0"),
        (lambda e: e["stats"].update(min="0.1"), "got '0.1'"),
        (lambda e: e["extra_info"].update(matmul_peak_gflops=0), "matmul_peak_gflops"),
        (lambda e: e["extra_info"].pop("points"), "points must be a number above 0"),
        (lambda e: e["extra_info"].pop("size"), "size must be text"),
        (lambda e: e["extra_info"].update(rel_error_vs_fp32=None), "rel_error_vs_fp32"),
        (lambda e: e["extra_info"].update(size="scale-1000k"), "peak_rss_bytes"),
        (lambda e: e["extra_info"].update(peak_rss_bytes="big"), "peak_rss_bytes"),
        (lambda e: e["extra_info"].update(points=10**400), "points must be a number above 0"),
        (lambda e: e["stats"].update(min=1e-300), "seconds must be between 1e-09 and 1e+07"),
        (lambda e: e["stats"].update(median=1e300), "median_seconds must be between"),
        (lambda e: e["extra_info"].update(points=1e300), "points must be at most 1e+18"),
        (lambda e: e["extra_info"].update(flops=1e300), "flops must be at most 1e+30"),
        (lambda e: e["extra_info"].update(matmul_peak_gflops=5e-324),
         "matmul_peak_gflops must be at least 0.001"),
        (lambda e: e["extra_info"].update(rows=5e-324), "rows must be at least 1"),
    ],
)
def test_an_unusable_entry_is_one_line_naming_the_field(bench_report, tmp_path, capsys,
                                                        change, named):
    bad = entry("engine-fp32", 0.01)
    change(bad)
    path = write_json(tmp_path / "bench.json", [entry("article-loop", 2.0), bad])

    assert bench_report.main([str(path), "--out", str(tmp_path / "report")]) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "benchmark 1 (engine-fp32)" in err and named in err
    assert not list(tmp_path.glob("report*"))


def test_an_entry_that_is_not_an_object_is_one_line(bench_report, tmp_path, capsys):
    path = write_json(tmp_path / "bench.json", ["engine-fp32"])

    assert bench_report.main([str(path)]) == 2
    assert "benchmark 0 is a str" in capsys.readouterr().err


@pytest.mark.parametrize(("document", "named"), [
    ({"benchmarks": {"a": 1}}, "no list of benchmarks"),
    ([], "no list of benchmarks"),
    ({"benchmarks": [], "machine_info": None}, "machine_info is a NoneType"),
])
def test_a_document_of_the_wrong_shape_is_one_line(bench_report, tmp_path, capsys, document,
                                                   named):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(document))

    assert bench_report.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err


def test_each_device_gets_its_own_targets(bench_report, tmp_path, capsys):
    entries = [entry("article-loop", 2.0), entry("engine-fp32", 0.01)]
    for item in (entry("article-loop", 1.0), entry("engine-fp32", 0.0005)):
        item["extra_info"]["device"] = "cuda"
        entries.append(item)
    path = write_json(tmp_path / "bench.json", entries)

    assert bench_report.main([str(path), "--out", str(tmp_path / "report")]) == 0

    text = capsys.readouterr().out
    cpu, cuda = text.split("Targets (CPU):")[1].split("Targets (cuda; the thresholds were set")
    loop_target = "Titanic job >= 150x the article loop (default engine: hoisted, eager fp32)"
    assert target_lines(cpu)[loop_target] == "200.0x | yes"
    assert target_lines(cuda)[loop_target] == "2000.0x | yes"


def test_unreadable_files_and_an_out_under_a_file_are_one_line(bench_report, tmp_path, capsys):
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe{")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    good = write_json(tmp_path / "bench.json", [entry("engine-fp32", 0.01)])
    (tmp_path / "a-file").write_text("")

    for argv in ([str(binary)], [str(deep)], [str(good), "--out", str(tmp_path / "a-file/x")]):
        assert bench_report.main(argv) == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_one_device_in_two_files_has_one_peak(bench_report, tmp_path, capsys):
    first = write_json(tmp_path / "a.json", [entry("engine-fp32", 0.01, matmul_peak_gflops=80.0)])
    second = write_json(tmp_path / "b.json", [entry("article-loop", 2.0)])

    assert bench_report.main([str(first), str(second), "--out", str(tmp_path / "r")]) == 0

    assert "peak (2048^2, same run): cpu: 100 GFLOP/s." in capsys.readouterr().out
