#!/usr/bin/env bash
# Run the kernel tests and the kernel benchmark on the first MAX accelerator.
#
#   bash bench/gpu_check.sh              # results in a temporary folder, path printed at the end
#   OUT=/some/dir bash bench/gpu_check.sh
#
# Writes to $OUT: kernel_tests.json (pass/fail counts and failures), kernel_tests.log,
# kernel_bench.jsonl (one JSON line per measurement) and kernel_bench.log.
# Each stage has its own time limit (TESTS_SECONDS, BENCH_SECONDS), so the script ends within
# 8 minutes even on a cold MAX cache. A stage cut short keeps what it measured so far.
# PYTHON selects the interpreter (default: python), which needs max, mojo, numpy and pytest.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT_DIR=${OUT:-$(mktemp -d)}
mkdir -p "$OUT_DIR"
TESTS_SECONDS=${TESTS_SECONDS:-270}
BENCH_SECONDS=${BENCH_SECONDS:-190}

"$PYTHON" - <<'PY'
from max.driver import accelerator_count
count = accelerator_count()
print(f"MAX sees {count} accelerator(s)")
if count == 0:
    raise SystemExit("no MAX accelerator found; run this script on a GPU machine")
PY
[ $? -eq 0 ] || exit 1

export MODGRAD_TEST_DEVICE=gpu
start=$(date +%s)
timeout "$TESTS_SECONDS" "$PYTHON" -m pytest tests/test_kernels.py -q -p no:cacheprovider \
    --junitxml "$OUT_DIR/kernel_tests.xml" >"$OUT_DIR/kernel_tests.log" 2>&1
tests_status=$?
tail -n 5 "$OUT_DIR/kernel_tests.log"

"$PYTHON" - "$OUT_DIR" "$tests_status" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
from pathlib import Path
import xml.etree.ElementTree as ET

out_dir, status, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
summary = {"exit_status": status, "seconds": seconds, "timed_out": status == 124}
junit = out_dir / "kernel_tests.xml"
if junit.is_file():
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    for key in ("tests", "failures", "errors", "skipped"):
        summary[key] = int(suite.get(key, 0))
    failed = []
    for case in suite.iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            failed.append(f"{case.get('name')}: {problem.get('message', '')[:300]}")
    summary["failed"] = failed
(out_dir / "kernel_tests.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary))
PY

timeout "$BENCH_SECONDS" "$PYTHON" bench/kernel_ops.py --device gpu --quick \
    --out "$OUT_DIR/kernel_bench.jsonl" >"$OUT_DIR/kernel_bench.log" 2>&1
bench_status=$?
cat "$OUT_DIR/kernel_bench.jsonl" 2>/dev/null
echo "tests exit $tests_status, bench exit $bench_status, $(( $(date +%s) - start )) s; results in $OUT_DIR"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
