#!/usr/bin/env bash
# Every GPU check in one go: the tests marked gpu, the CUDA benchmarks, their report.
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]        (default ./results)
#
# Runs with the python on PATH, or $PYTHON, as it is: nothing is downloaded. For a
# machine without network, bring the data (data/train.csv) and any missing wheels in
# .whl/ (captum: pip download --no-deps -d .whl captum==0.9.0); they are installed into
# a private folder first. Each stage has a time limit (TEST_SECONDS, BENCH_SECONDS) and
# writes its own files, so a stage that runs out of time leaves the others' results:
#   gpu_tests.xml, gpu_tests.log       the tests (JUnit XML and the log)
#   bench_gpu_<size>.json, bench.log   pytest-benchmark's JSON per job size, the log
#   bench_gpu_report.md, .png          scripts/bench_report.py over those JSONs
# Exit 0: all passed, or no CUDA device is visible (said so). Exit 1: a stage failed,
# or nvidia-smi sees a GPU that torch cannot use (a CPU build, or a driver too old).
set -u
# The results folder is relative to where the script is called from.
RESULTS=$(realpath -m "${1:-results}")
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no CUDA device is visible (nvidia-smi not found): GPU checks skipped"
    exit 0
fi
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "nvidia-smi fails (no driver loaded?): GPU checks skipped"
    exit 0
fi
if [[ -v CUDA_VISIBLE_DEVICES && -z "$CUDA_VISIBLE_DEVICES" ]]; then
    echo "CUDA_VISIBLE_DEVICES is empty, which hides every GPU: GPU checks skipped"
    exit 0
fi
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "error: $PYTHON cannot import torch" >&2
    exit 1
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    site="${TMPDIR:-/tmp}/engine-gpu-site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    build=$("$PYTHON" -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda)")
    echo "error: nvidia-smi sees a GPU but torch ($build) cannot use it:" \
         "a CPU build of torch, or a driver older than its CUDA" >&2
    exit 1
fi

# This run's files only: a stage that fails must not leave an earlier run's in place.
mkdir -p "$RESULTS"
rm -f "$RESULTS"/gpu_tests.xml "$RESULTS"/gpu_tests.log "$RESULTS"/bench.log \
    "$RESULTS"/bench_gpu_*.json "$RESULTS"/bench_gpu_report.md "$RESULTS"/bench_gpu_report.png
[[ -f data/train.csv ]] || echo "warning: no data/train.csv; the benchmarks will try to" \
                                "download the Titanic data" >&2
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"

status=0
timeout "${TEST_SECONDS:-240}" "$PYTHON" -m pytest tests/ -m gpu -q -ra -p no:cacheprovider \
    --junitxml="$RESULTS/gpu_tests.xml" 2>&1 | tee "$RESULTS/gpu_tests.log"
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1

# One size at a time: a size that runs out of time keeps the other's JSON.
: >"$RESULTS/bench.log"
for size in titanic-179 tiled-20k; do
    timeout "${BENCH_SECONDS:-180}" "$PYTHON" -m pytest bench/test_titanic.py -m gpu \
        -k "cuda and $size" --benchmark-only -p no:cacheprovider \
        --benchmark-json="$RESULTS/bench_gpu_$size.json" 2>&1 | tee -a "$RESULTS/bench.log"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
done

jsons=()
for size in titanic-179 tiled-20k; do
    [[ -s "$RESULTS/bench_gpu_$size.json" ]] && jsons+=("$RESULTS/bench_gpu_$size.json")
done
if (( ${#jsons[@]} )); then
    "$PYTHON" scripts/bench_report.py "${jsons[@]}" --out "$RESULTS/bench_gpu_report" || status=1
else
    echo "error: no benchmark finished, so no report" >&2
    status=1
fi
exit $status
