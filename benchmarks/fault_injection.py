"""Kill every stage at random moments, rerun the same command, and check every artifact against an uninterrupted run.

For each stage (train, cluster, distill, attribute, evaluate, one diagnose task) on the smoke preset:
copy the run directory as it is before the stage, start the stage's command, SIGKILL its whole process
group after a random delay drawn uniformly between the uninterrupted command's first log line (the end of
Python's start-up, which at this size lasts as long as the work) and its end (``--from-start``: from 0), so
kills land in the work, the shard merges and the final write alike; rerun the same command to
completion, and compare every HDF5 file with the uninterrupted run's (``compare_runs.compare_file``:
datasets bit for bit, attrs except timings and provenance). One thread per process
(``OMP_NUM_THREADS=1``), so the numbers do not depend on the thread count.

    python benchmarks/fault_injection.py --kills 20 --work /tmp/faults       # the issue's >= 20 per stage
    python benchmarks/fault_injection.py --kills 3 --stages train,attribute  # a quick look

Prints one row per stage: kills that interrupted the command, commands that had finished before their
kill, reruns whose artifacts all matched, and the phases the kills landed in (the command's last log
line before the kill). Exit status 1 if any rerun failed or differed.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_runs import compare_file

SMOKE = ["--preset", "smoke", "--no-progress"]
STAGE_ARGS = {
    "train": ["train"],
    "cluster": ["cluster"],
    "distill": ["distill", "--shards", "3", "--workers", "2"],
    "attribute": ["attribute", "--shards", "2"],
    "evaluate": ["evaluate", "--n-masks", "4", "--noise-seeds", "1", "--methods", "random,clustering,ddm",
                 "--no-plots", "--workers", "2"],
    "diagnose": ["diagnose", "--tasks", "unlearn"],
}
STAGES = tuple(STAGE_ARGS)


@dataclass
class StageResult:
    stage: str
    interrupted: int = 0
    finished_first: int = 0
    matched: int = 0
    failures: list[str] = field(default_factory=list)
    phases: Counter = field(default_factory=Counter)
    leftovers: int = 0  # temp files of killed writers left in the directory after the rerun


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def command(stage: str, run_dir: Path, data_root: str) -> list[str]:
    return [sys.executable, "-m", "ddm_hpc.cli", *STAGE_ARGS[stage], *SMOKE, "--data-root", data_root,
            "--out", str(run_dir)]


def _run(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` to completion: (seconds until its first log line, i.e. Python's start-up; total seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    for _ in proc.stderr:
        if first is None:
            first = time.perf_counter() - t0
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    total = time.perf_counter() - t0
    return (first if first is not None else 0.0), total


def reference(work: Path, data_root: str, stages: tuple[str, ...]
              ) -> tuple[Path, dict[str, Path], dict[str, tuple[float, float]]]:
    """The uninterrupted run, a snapshot of the directory before each stage, and each command's (start-up, wall)
    seconds."""
    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    before, seconds = {}, {}
    for stage in STAGES:
        if stage in stages:
            snap = work / f"before-{stage}"
            shutil.rmtree(snap, ignore_errors=True)
            if ref.exists():
                shutil.copytree(ref, snap, symlinks=True)
            before[stage] = snap
        seconds[stage] = _run(command(stage, ref, data_root))
    return ref, before, seconds


def artifacts(run_dir: Path) -> list[Path]:
    return sorted(p.relative_to(run_dir) for p in run_dir.rglob("*.h5")
                  if not {"shards", ".data"} & set(p.relative_to(run_dir).parts))


def phase(log_text: str) -> str:
    """Where a killed command was: its last log line, numbers and logger prefixes stripped."""
    lines = [re.sub(r"^\d{4}-\d\d-\d\d [\d:,]+ \S+: ", "", line) for line in log_text.splitlines() if line.strip()]
    if not lines:
        return "start-up (nothing logged yet)"
    if any(line.startswith("this invocation:") for line in lines):
        return "after the summary (exiting)"
    return re.sub(r"\d+(\.\d+)?", "#", lines[-1])[:48]


def kill_and_resume(stage: str, ref: Path, snap: Path, delay: float, trial: Path, data_root: str,
                    result: StageResult) -> None:
    """One kill of ``stage``'s command ``delay`` seconds after its start, the rerun, and the comparison."""
    shutil.rmtree(trial, ignore_errors=True)
    if snap.exists():
        shutil.copytree(snap, trial, symlinks=True)
    log = trial.parent / f"{trial.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command(stage, trial, data_root), env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=delay)
            result.finished_first += 1
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            result.interrupted += 1
            result.phases[phase(log.read_text())] += 1
    rerun = subprocess.run(command(stage, trial, data_root), env=_env(), capture_output=True, text=True, check=False)
    if rerun.returncode != 0:
        tail = (rerun.stderr.strip().splitlines() or ["?"])[-1]
        result.failures.append(f"{trial.name}: rerun exit {rerun.returncode}: {tail}")
        return
    roots = (str(ref.resolve()), str(trial.resolve()), str(ref), str(trial))
    want = [p for p in artifacts(ref) if (snap / p).exists() or p in artifacts(trial)]
    problems = []
    for rel in want:
        if not (trial / rel).exists():
            problems.append(f"{rel}: missing")
            continue
        problems += [f"{rel}: {p}" for p in compare_file(ref / rel, trial / rel, roots)]
    if problems:
        result.failures.append(f"{trial.name} (killed after {delay:.2f} s): " + "; ".join(problems[:3]))
    else:
        result.matched += 1
    result.leftovers += sum(1 for p in trial.rglob("*") if ".tmp." in p.name)


def run_harness(work: Path, data_root: str, kills: int, stages: tuple[str, ...] = STAGES, seed: int = 0,
                after_startup: bool = True) -> list[StageResult]:
    """``kills`` kills of each stage; with ``after_startup`` the kill times are drawn after the command's first log
    line (start-up is the same for every stage and dominates at the smoke size), else over its whole wall time."""
    work.mkdir(parents=True, exist_ok=True)
    ref, before, seconds = reference(work, data_root, stages)
    rng = random.Random(seed)
    results = []
    for stage in stages:
        res = StageResult(stage)
        for i in range(kills):
            startup, wall = seconds[stage]
            delay = rng.uniform(startup if after_startup else 0.0, wall)
            kill_and_resume(stage, ref, before[stage], delay, work / f"{stage}-{i:03d}", data_root, res)
            shutil.rmtree(work / f"{stage}-{i:03d}", ignore_errors=True)
        results.append(res)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="kills per stage")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    ap.add_argument("--work", type=Path, default=Path("runs/faults"), help="scratch folder (emptied)")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    ap.add_argument("--from-start", action="store_true",
                    help="draw kill times over the whole command, start-up included (default: after its first log line)")
    args = ap.parse_args()
    stages = tuple(s for s in args.stages.split(",") if s)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        sys.exit(f"fault_injection: error: unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    t0 = time.perf_counter()
    results = run_harness(args.work, str(Path(args.data_root).resolve()), args.kills, stages, args.seed,
                          not args.from_start)
    print("| stage | kills that interrupted | finished before the kill | reruns identical | temp files left | "
          "where the kills landed (last log line) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        where = ", ".join(f"{k} x{n}" for k, n in r.phases.most_common(4))
        print(f"| {r.stage} | {r.interrupted} | {r.finished_first} | {r.matched} of {r.interrupted + r.finished_first}"
              f" | {r.leftovers} | {where} |")
    for r in results:
        for f in r.failures:
            print(f"FAILED {r.stage}: {f}")
    print(f"{time.perf_counter() - t0:.0f} s")
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
