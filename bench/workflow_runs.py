"""The GPU runs behind docs/results.md: both workflows of docs/workflows.md as a list of jobs (train a
config, evaluate a checkpoint), run in calls of a fixed time budget that each resume where the last
one stopped, and the tables the results page reports.

    PYTHONPATH=. python3 bench/workflow_runs.py run pretrain --out $OUT --budget 540
    PYTHONPATH=. python3 bench/workflow_runs.py run long --out $OUT --budget 540
    python3 bench/workflow_runs.py report DIR [DIR ...]      # Markdown tables from collected outputs

`run` goes through the workflow's jobs in order, skipping those finished in an earlier call (a
marker under runs/_jobs/). A training job still running at the budget's end gets SIGTERM: the loop
saves its step and exits, and the next call resumes it from there. An evaluation cut off starts over.
Each finished job's outputs (metrics.jsonl and config.json of a run; results.json, results.md and
plots of an evaluation) and every job's log are copied to --out/<job>/. `--tiny` runs the CPU-size
configs with short evaluations, to check the chain end to end. `--only JOB,JOB` runs those jobs only
(their inputs must exist), so that independent chains can share a call or a GPU.

`report` reads one or more such --out folders (later folders win for a job found twice) and prints
the pretraining table (validation loss at equal tokens against dense, tokens/s) and the
short-to-long table (loss and passkey accuracy against length per variant).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

JOBS_DIR = Path("runs/_jobs")
# What the retrieval comparisons measure (docs/results.md): loss and every RULER-style task.
RETRIEVAL_TASKS = "loss,passkey,niah_single,niah_multikey,niah_multivalue,mqar,vartrack"
SAVE_GRACE_S = 90      # after SIGTERM, time for the loop to write its checkpoint
MIN_START_S = 45       # a job is not started with less budget left than this


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    argv: tuple[str, ...]          # after `python3`
    run: str                       # the run directory it trains or evaluates
    evaluation: bool = False       # outputs under runs/_results/<name>, else the run's own files

    @property
    def results_dir(self) -> Path:
        return Path("runs/_results") / self.name


def _train(config: str, tiny: bool) -> Job:
    name = config.replace("pretrain_", "pretrain_tiny_").replace("long_", "long_tiny_") if tiny else config
    return Job(name, ("train.py", "--config", f"configs/{name}.py", "trainer.progress_bar=false"), f"runs/{name}")


def _evaluate(name: str, run: str, lengths: tuple[int, int], tasks: str, tiny: bool, *overrides: str) -> Job:
    samples = ("--samples", "1", "--depths", "0,1", "--loss_tokens", "2048") if tiny else ("--samples", "8")
    argv = ("-m", "sparsetrain.eval", run, *overrides, "--out", f"runs/_results/{name}", "--tasks", tasks,
            "--min_len", str(lengths[0]), "--max_len", str(lengths[1]), "--no_progress", *samples)
    return Job(name, argv, run, evaluation=True)


def workflow_jobs(workflow: str, tiny: bool = False) -> list[Job]:
    """The jobs of one workflow, in the order they must run."""
    if workflow == "pretrain":
        lengths = (64, 256) if tiny else (1024, 8192)
        jobs = []
        for method in ("dense", "moba", "infllm_v2", "nsa"):
            train = _train(f"pretrain_{method}", tiny)
            jobs += [train, _evaluate(f"eval_{train.name}", train.run, lengths, "loss", tiny)]
        return jobs
    if workflow == "long":
        short, long = (128, 512) if tiny else (2048, 16384)
        lengths = (short // 2 if tiny else 1024, long)
        factor = long // short
        pretrained = _train("pretrain_short_dense", tiny)
        jobs = [pretrained, _evaluate("no_adaptation", pretrained.run, (short // 4, 4 * short), RETRIEVAL_TASKS, tiny)]
        for scaling in ("linear", "ntk", "yarn"):
            jobs.append(_evaluate(f"rope_{scaling}", pretrained.run, lengths, "loss,passkey", tiny,
                                  f"model.rope.scaling={scaling}", f"model.rope.factor={factor}",
                                  *((f"model.rope.original_max_len={short}",) if scaling == "yarn" else ())))
        for variant in ("dense", "infllm_v2", "seer"):
            train = _train(f"long_{variant}", tiny)
            jobs += [train, _evaluate(f"eval_{train.name}", train.run, (short, long), RETRIEVAL_TASKS, tiny)]
        return jobs
    raise ValueError(f"workflow {workflow!r}: choose pretrain or long")


def _run_job(job: Job, deadline: float, log: Path) -> bool:
    """Run one job until it ends or the deadline; True when it finished."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    with open(log, "a") as out:
        out.write(f"\n=== {time.strftime('%H:%M:%S')} python3 {' '.join(job.argv)}\n")
        out.flush()
        proc = subprocess.Popen([sys.executable, *job.argv], stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)   # a training run saves its step; an evaluation is lost
            try:
                proc.wait(timeout=SAVE_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
            out.write("=== stopped at the budget's end (SIGTERM)\n")
            return False
    if code != 0:
        raise SystemExit(f"{job.name} failed (exit {code}); its log: {log}")
    if job.evaluation:
        return True
    return not _train_summary_line(log).get("interrupted", False)


def _train_summary_line(log: Path) -> dict:
    """train.py's closing JSON line (its last; warnings printed at exit may follow it)."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{") and '"interrupted"' in line:
            return json.loads(line)
    raise SystemExit(f"no summary line from train.py in {log}")


def _collect(job: Job, out: Path) -> None:
    dest = out / job.name
    dest.mkdir(parents=True, exist_ok=True)
    if job.evaluation:
        for path in job.results_dir.iterdir():
            if path.suffix in (".json", ".md", ".png"):
                shutil.copy(path, dest / path.name)
    else:
        for name in ("metrics.jsonl", "config.json"):
            if (Path(job.run) / name).exists():
                shutil.copy(Path(job.run) / name, dest / name)


def selected_jobs(workflow: str, tiny: bool, only: tuple[str, ...] = ()) -> list[Job]:
    """The workflow's jobs, or those named in `only`, in workflow order."""
    jobs = workflow_jobs(workflow, tiny)
    unknown = set(only) - {job.name for job in jobs}
    if unknown:
        raise SystemExit(f"--only: {', '.join(sorted(unknown))} not in workflow {workflow}; "
                         f"its jobs: {', '.join(job.name for job in jobs)}")
    return [job for job in jobs if not only or job.name in only]


def run(workflow: str, out: Path, budget: float, tiny: bool, only: tuple[str, ...] = ()) -> None:
    deadline = time.time() + budget
    JOBS_DIR.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for job in selected_jobs(workflow, tiny, only):
        marker = JOBS_DIR / f"{job.name}.done"
        if marker.exists():
            continue
        if deadline - time.time() < MIN_START_S:
            print(f"budget spent: {job.name} and later jobs wait for the next call", flush=True)
            break
        start = time.time()
        log = out / "logs" / f"{job.name}.log"
        finished = _run_job(job, deadline, log)
        _collect(job, out)   # also a stopped run's metrics so far
        print(f"{job.name}: {'done' if finished else 'stopped, resumes next call'} "
              f"in {time.time() - start:.0f} s", flush=True)
        if not finished:
            break
        marker.write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
    else:
        print(f"workflow {workflow}: every job done", flush=True)


# ---- report ----

def _latest(dirs: list[Path], job: str, name: str) -> Path | None:
    found = [d / job / name for d in dirs if (d / job / name).exists()]
    return found[-1] if found else None


def _train_summary(dirs: list[Path], job: str) -> dict | None:
    """{"step", "val_loss" (last), "tokens_per_sec" (median over logged windows)} of a run."""
    path = _latest(dirs, job, "metrics.jsonl")
    if path is None:
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    val = [r for r in records if "val/loss" in r]
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    return {"step": max(r["step"] for r in records), "val_loss": val[-1]["val/loss"] if val else None,
            "tokens_per_sec": statistics.median(speeds) if speeds else None}


def _eval_results(dirs: list[Path], job: str) -> dict | None:
    path = _latest(dirs, job, "results.json")
    return json.loads(path.read_text()) if path else None


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def pretrain_table(dirs: list[Path], tiny: bool = False) -> list[str]:
    lines = ["| method | steps | val loss | vs dense | tokens/s | vs dense | eval loss (sparse / dense mode) at the longest length |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    jobs = [job for job in workflow_jobs("pretrain", tiny) if not job.evaluation]
    base = _train_summary(dirs, jobs[0].name) or {}
    for job in jobs:
        s = _train_summary(dirs, job.name)
        if s is None:
            lines.append(f"| {job.name} | not run | | | | | |")
            continue
        loss_vs = (f"{100 * (s['val_loss'] / base['val_loss'] - 1):+.2f}%"
                   if s["val_loss"] and base.get("val_loss") else "—")
        speed_vs = (f"{s['tokens_per_sec'] / base['tokens_per_sec']:.2f}x"
                    if s["tokens_per_sec"] and base.get("tokens_per_sec") else "—")
        ev = _eval_results(dirs, f"eval_{job.name}") or {"loss": {}}
        longest = max((int(k) for mode in ev["loss"].values() for k in mode), default=None)
        at = lambda mode: ev["loss"].get(mode, {}).get(str(longest), {}).get("loss")  # noqa: E731
        lines.append(f"| {job.name} | {s['step']} | {_fmt(s['val_loss'], '.4f')} | {loss_vs} | "
                     f"{_fmt(s['tokens_per_sec'], ',.0f')} | {speed_vs} | "
                     f"{_fmt(at('sparse'), '.4f')} / {_fmt(at('dense'), '.4f')} ({longest}) |")
    return lines


def long_table(dirs: list[Path], tiny: bool = False) -> list[str]:
    rows = [job for job in workflow_jobs("long", tiny) if job.evaluation]
    results = {job.name: _eval_results(dirs, job.name) for job in rows}
    lengths = sorted({int(k) for r in results.values() if r for mode in r["loss"].values() for k in mode})
    head = " | ".join(f"loss@{n}" for n in lengths) + " | " + " | ".join(f"passkey@{n}" for n in lengths)
    lines = [f"| variant | mode | {head} | density@{lengths[-1] if lengths else ''} |",
             "| --- | --- |" + " --- |" * (2 * len(lengths) + 1)]
    for job in rows:
        r = results[job.name]
        if r is None:
            lines.append(f"| {job.name} | not run |" + " |" * (2 * len(lengths) + 1))
            continue
        for mode in r["loss"]:
            losses = [_fmt(r["loss"][mode].get(str(n), {}).get("loss"), ".3f") for n in lengths]
            keys = []
            for n in lengths:
                by_depth = r.get("retrieval", {}).get("passkey", {}).get(mode, {}).get(str(n))
                keys.append(_fmt(statistics.mean(c["exact"] for c in by_depth.values()), ".0%") if by_depth else "—")
            density = r["layers"].get(str(lengths[-1]), {}).get("density") if mode == "sparse" else None
            mean_density = statistics.mean(density.values()) if density else None
            lines.append(f"| {job.name} | {mode} | {' | '.join(losses)} | {' | '.join(keys)} | "
                         f"{_fmt(mean_density, '.3f')} |")
    return lines


def retrieval_table(dirs: list[Path], tiny: bool = False) -> list[str]:
    """Every evaluation with retrieval results: per mode and length, each task's exact match (mean
    over depths), the document-aligned loss and the measured density."""
    tasks = [t for t in RETRIEVAL_TASKS.split(",") if t != "loss"]
    lines = [f"| run | mode | length | loss | density | {' | '.join(tasks)} |",
             "| --- | --- | --- | --- | --- |" + " --- |" * len(tasks)]
    for workflow in ("pretrain", "long"):
        for job in workflow_jobs(workflow, tiny):
            r = _eval_results(dirs, job.name) if job.evaluation else None
            if not r or not r.get("retrieval"):
                continue
            modes = dict.fromkeys(m for per_mode in r["retrieval"].values() for m in per_mode)
            for mode in modes:
                lengths = sorted({n for per_mode in r["retrieval"].values() for n in per_mode.get(mode, {})}, key=int)
                for n in lengths:
                    cells = []
                    for task in tasks:
                        by_depth = r["retrieval"].get(task, {}).get(mode, {}).get(n)
                        cells.append(_fmt(statistics.mean(c["exact"] for c in by_depth.values()), ".0%")
                                     if by_depth else "skipped")
                    density = r["layers"].get(n, {}).get("density") if mode == "sparse" else None
                    loss = r["loss"].get(mode, {}).get(n, {}).get("loss")
                    lines.append(f"| {job.name} | {mode} | {n} | {_fmt(loss, '.4f')} | "
                                 f"{_fmt(statistics.mean(density.values()) if density else None, '.3f')} | "
                                 f"{' | '.join(cells)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("workflow", choices=("pretrain", "long"))
    run_parser.add_argument("--out", required=True, type=Path)
    run_parser.add_argument("--budget", type=float, default=540, help="seconds this call may take")
    run_parser.add_argument("--tiny", action="store_true", help="the CPU-size configs")
    run_parser.add_argument("--only", type=lambda text: tuple(text.split(",")), default=(),
                            help="comma-separated job names: run only these (e.g. a chain split over calls)")
    report_parser = sub.add_parser("report")
    report_parser.add_argument("dirs", nargs="+", type=Path)
    report_parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.command == "run":
        run(args.workflow, args.out, args.budget, args.tiny, args.only)
    else:
        print("\n".join(["## Pretraining", "", *pretrain_table(args.dirs, args.tiny), "",
                         "## Short to long", "", *long_table(args.dirs, args.tiny), "",
                         "## Retrieval", "", *retrieval_table(args.dirs, args.tiny)]))


if __name__ == "__main__":
    main()
