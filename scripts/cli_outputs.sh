#!/usr/bin/env bash
# What `tdlrt train/report/export/eval/bench` write for a fixed set of small inputs, with the figures that
# change from run to run (times, speeds, dates, folders) blanked, so that two versions of the code can be
# compared by diff:
#   bash scripts/cli_outputs.sh OUT                 this checkout's code
#   CODE=/path/to/other/checkout bash scripts/cli_outputs.sh OUT2 && diff -r OUT OUT2
# Runs LeNet5 on the first 2,000 MNIST images (needs data/MNIST or $TDLRT_DATA; about 2 minutes on one core):
# the tau rule, the target rule, a fixed-rank baseline, a run stopped at epoch 1 and resumed to epoch 3,
# then the report of all of them, an export and an eval of one, and the bench's table of columns.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
code=$(cd "${CODE:-$here}" && pwd)
out=${1:?usage: scripts/cli_outputs.sh OUT}
rm -rf "$out" && mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH=$code OMP_NUM_THREADS=1 TDLRT_DATA=${TDLRT_DATA:-$here/data}
tdlrt() { (cd "$out" && python -m tdlrt_cli "$@"); }
common="model=lenet5 data=mnist data.limit_train=2000 data.limit_test=1000 batch_size=64 lr=0.05 progress=false
        device=cpu threads=1 cost_report=false seed=0"
runs=$out/runs

tdlrt train $common epochs=3 method=tdlrt tau=0.1 hydra.run.dir=$runs/tau > "$out/tau.out" 2>&1
tdlrt train $common epochs=3 method=tdlrt method.target_cr=90 hydra.run.dir=$runs/target > "$out/target.out" 2>&1
tdlrt train $common epochs=3 method=tucker method.target_cr=90 hydra.run.dir=$runs/tucker > "$out/tucker.out" 2>&1
tdlrt train $common epochs=1 method=tdlrt method.target_cr=90 hydra.run.dir=$runs/resumed > "$out/resumed.out" 2>&1
tdlrt train epochs=3 resume=$runs/resumed >> "$out/resumed.out" 2>&1
tdlrt train epochs=3 resume=$runs/resumed >> "$out/resumed.out" 2>&1 || true  # finished: nothing to do
tdlrt report "$runs" out="$out/report" > "$out/report.out" 2>&1
tdlrt export "$runs/target" out="$out/target.pt2" > "$out/export.out" 2>&1
tdlrt eval "$runs/target" > "$out/eval.out" 2>&1
tdlrt bench model=lenet5 batch_size=8 steps=2 warmup=1 format=json device=cpu > "$out/bench.json" 2> "$out/bench.err"

python - "$out" "$code" "$TDLRT_DATA" <<'EOF'
"""Blank what changes between runs; keep every other byte."""
import csv, hashlib, json, re, shutil, sys
from pathlib import Path

out, code, data = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
VOLATILE = re.compile(r"wall_time|time_s|images_per_s|started|provenance|run_dir|^path$|host|git_|torch$|ms$|_ms|^ms_|"
                      r"latency|seconds|elapsed|ratio_vs_dense|_share")


def blank_text(text):
    text = text.replace(str(out), "OUT").replace(data, "DATA").replace(code, "CODE")
    text = re.sub(r"(?m)^W\d{4} .*\n", "", text)  # torch's own start-up warnings (they carry a time)
    text = re.sub(r"\d{4}-\d\d-\d\d[T_ ]\d\d[:-]\d\d[:-]\d\d(\+00:00)?", "DATE", text)
    text = re.sub(r"[\d.,]+ img/s", "N img/s", text)
    text = re.sub(r"\| [\d.]+ s\b", "| N s", text)
    text = re.sub(r"\d+(\.\d+)? (ms|s)\b", "N \\2", text)
    text = re.sub(r"(?m)^(latency [^:]*:[^ ]*).*$", "\\1 (timed)", text)
    return text


def blank_json(value, key=""):
    if isinstance(value, dict):
        return {k: ("X" if VOLATILE.search(k) else blank_json(v, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [blank_json(v, key) for v in value]
    return blank_text(value) if isinstance(value, str) else value


for board in sorted(out.rglob("tensorboard")):  # event files are named by time, host and PID
    count = len(list(board.iterdir()))
    shutil.rmtree(board)
    board.with_name("tensorboard.txt").write_text(f"{count} event files\n")
for path in sorted(out.rglob("*")):
    if not path.is_file():
        continue
    if path.suffix == ".png":  # matplotlib's PNGs carry no date: the same figure is the same bytes
        path.write_text(f"png, sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}\n")
    elif path.suffix in (".pt", ".pt2", ".pdf") or path.name == ".lock":
        path.write_text(f"({path.suffix} file: {'present' if path.stat().st_size else 'empty'})\n")
    elif path.suffix == ".json":
        path.write_text(json.dumps(blank_json(json.loads(path.read_text())), indent=1, sort_keys=True) + "\n")
    elif path.suffix == ".csv":
        rows = list(csv.reader(path.open()))
        drop = {i for i, name in enumerate(rows[0]) if VOLATILE.search(name)} if rows else set()
        path.write_text("".join(",".join(blank_text(c) for i, c in enumerate(r) if i not in drop) + "\n" for r in rows))
    else:
        path.write_text(blank_text(path.read_text(errors="replace")))
for resumed in (out / "runs").glob("*/.hydra/resume-*"):  # named by the time of the resume
    resumed.rename(resumed.with_name("resume-DATE"))
EOF
echo "outputs in $out"
