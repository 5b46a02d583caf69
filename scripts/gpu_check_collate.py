"""Collate the stages of scripts/gpu_check.sh into gpu_check.json and gpu_check.md (format: see the script).

    python scripts/gpu_check_collate.py --work WORK --out DIR --dry-run 0|1

WORK holds stages.tsv (name, exit code, seconds per line), tests.xml (pytest's JUnit XML), bench_*.out
(``tdlrt bench format=json``) and train_<method>/summary.json (the run folders).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's tdlrt_cli, installed or not
from tdlrt_cli.summary import accuracies  # noqa: E402  (summary.json's accuracies, by the names it has had)
from typing import List, Optional

STAGES = ("setup", "tests", "bench_fp32", "bench_exact", "bench_bf16", "bench_graph", "train_dense", "train_tdlrt")
BENCH_STAGES = ("bench_fp32", "bench_exact", "bench_bf16", "bench_graph")
BENCH_KEYS = ("method", "rank_frac", "augment_every", "spectra", "ms_per_step", "ms_iqr", "images_per_s",
              "ratio_vs_dense", "ratio_vs_dense_graph", "truncation_share", "truncation_ms", "truncation_ms_iqr",
              "peak_mem_mib", "compression_rate", "params", "flops_forward", "flops_train")
TRAIN_KEYS = ("epochs", "steps", "wall_time_s", "compression_rate", "ranks")  # and summary.accuracies


def git(*args: str) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def meta(dry_run: bool) -> dict:
    import torch

    commit = git("rev-parse", "HEAD") or os.environ.get("GPU_CHECK_COMMIT") or "unknown"
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": commit, "git_dirty": None if status is None else bool(status),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "host": platform.node(), "dry_run": dry_run}


def stages(work: Path) -> dict:
    """Status per stage: ok (exit 0), timeout (124, 137: killed by the time limit), none selected (the tests
    stage, pytest's 5), failed; a stage that never ran is missing."""
    out = {}
    path = work / "stages.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, code, seconds = line.split("\t")
        code = int(code)
        status = {0: "ok", 124: "timeout", 137: "timeout"}.get(code, "failed")
        if name == "tests" and code == 5:
            status = "none selected"
        out[name] = {"status": status, "exit_code": code, "seconds": float(seconds)}
    for name in STAGES:
        out.setdefault(name, {"status": "missing", "exit_code": None, "seconds": None})
    return out


def tests(work: Path) -> dict:
    counts = {"selection": "-k cuda", "passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    path = work / "tests.xml"
    if not path.is_file():
        return counts
    root = ET.parse(path).getroot()
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        total = int(suite.get("tests", 0))
        failed, errors, skipped = (int(suite.get(k, 0)) for k in ("failures", "errors", "skipped"))
        counts["failed"] += failed
        counts["errors"] += errors
        counts["skipped"] += skipped
        counts["passed"] += total - failed - errors - skipped
    return counts


def bench(work: Path):
    rows, runs = [], []
    for name in BENCH_STAGES:
        try:
            out = json.loads((work / f"{name}.out").read_text())
        except (OSError, ValueError):
            continue
        cfg = out["config"]
        runs.append({"stage": name, "precision": cfg["precision"], "spectra": cfg["spectra"], "device": out["device"],
                     "torch": out["torch"], "notes": out.get("notes", [])})
        rows += [{"stage": name, "precision": cfg["precision"], **{k: r.get(k) for k in BENCH_KEYS}}
                 for r in out["results"]]
    return rows, runs


def training(work: Path) -> List[dict]:
    rows = []
    for method in ("dense", "tdlrt"):
        path = work / f"train_{method}" / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        config = summary.get("config", {})
        row = {"method": method, "model": config.get("model", {}).get("name"), "data": config.get("data", {}).get("name"),
               **{k: summary.get(k) for k in TRAIN_KEYS}, **accuracies(summary), "cost": summary.get("cost")}
        steps, wall = row["steps"], row["wall_time_s"]
        row["ms_per_step"] = 1000 * wall / steps if steps and wall else None
        rows.append(row)
    return rows


def fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = ["# tdlrt gpu_check" + (" (dry run, CPU, tiny sizes)" if m["dry_run"] else ""), "",
             f"- date: {m['date']}", f"- git commit: {m['git_commit']}" + (" (dirty)" if m["git_dirty"] else ""),
             f"- GPU: {m['gpu']}", f"- torch {m['torch']}, CUDA {m['cuda']}, Python {m['python']}, host {m['host']}",
             "", "## Stages", "", "| stage | status | exit code | seconds |", "|---|---|---|---|"]
    for name, s in result["stages"].items():
        lines.append(f"| {name} | {s['status']} | {fmt(s['exit_code'])} | {fmt(s['seconds'], '.1f')} |")
    t = result["tests"]
    lines += ["", f"Tests ({t['selection']}): {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped, "
              f"{t['errors']} errors.", "", "## tdlrt bench", ""]
    for run in result["bench_runs"]:
        lines.append(f"- {run['stage']}: {run['precision']}, spectra={run['spectra']}, {run['device']}, torch {run['torch']}"
                     + "".join(f"; note: {n}" for n in run["notes"]))
    lines += ["", "| precision | method | spectra | ranks | augment_every | ms/step (median) | IQR ms | vs dense "
              "| vs dense graph | truncation share | truncation ms | peak MiB | c.r. % |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["bench"]:
        lines.append(f"| {r['precision']} | {r['method']} | {fmt(r['spectra'])} | {fmt(r['rank_frac'], '.0%')} | "
                     f"{fmt(r['augment_every'])} | "
                     f"{fmt(r['ms_per_step'], '.2f')} | {fmt(r['ms_iqr'], '.2f')} | {fmt(r['ratio_vs_dense'], '.2f')} | "
                     f"{fmt(r['ratio_vs_dense_graph'], '.2f')} | {fmt(r['truncation_share'], '.1%')} | "
                     f"{fmt(r['truncation_ms'], '.2f')} | {fmt(r['peak_mem_mib'], '.0f')} | "
                     f"{fmt(r['compression_rate'], '.1f')} |")
    lines += ["", "## Training (CIFAR-10 shapes)", "",
              "| method | model | data | epochs | steps | test acc % | max over epochs % | wall s | ms/step | c.r. % |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["training"]:
        lines.append(f"| {r['method']} | {fmt(r['model'])} | {fmt(r['data'])} | {fmt(r['epochs'])} | {fmt(r['steps'])} | "
                     f"{fmt(r['test_acc'], '.2f')} | {fmt(r['test_acc_max_epoch'], '.2f')} | {fmt(r['wall_time_s'], '.1f')} | "
                     f"{fmt(r['ms_per_step'], '.1f')} | {fmt(r['compression_rate'], '.1f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", type=int, choices=(0, 1), default=0)
    args = parser.parse_args(argv)
    rows, runs = bench(args.work)
    result = {"meta": meta(bool(args.dry_run)), "stages": stages(args.work), "tests": tests(args.work),
              "bench": rows, "bench_runs": runs, "training": training(args.work)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(result))


if __name__ == "__main__":
    sys.exit(main())
