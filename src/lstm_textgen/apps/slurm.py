"""`lstm-textgen slurm submit|status`: the pipeline as a SLURM batch job.

    lstm-textgen slurm submit --nodes 2 --gpus-per-node 4 --time 4:00:00 -- -S model.layers=3
    lstm-textgen slurm submit --dry-run -- -S train.max_steps=2000     # print the script, submit nothing
    lstm-textgen slurm status                                          # this project's jobs

`submit` writes a batch script that runs `dvc exp run` (with the `-S` settings after `--`) in this
repository inside the allocation, keeps it with its log in `.slurm/NAME/`, and submits it with
`sbatch`. Inside the job the train stage spreads over the allocation's nodes (`train.launcher: auto`,
`train/slurm.py`); every other stage runs once on the batch host. The job asks for SIGTERM
`--signal-seconds` before its time limit and, with `--requeue`, to be requeued when preempted: a
requeued job resumes from its last checkpoint into the same MLflow run and the same experiment.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lstm_textgen.errors import UserError

JOB_PREFIX = "lstm-textgen-"
JOBS_DIR = Path(".slurm")
TIME_LIMIT = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # sbatch's [D-]HH:MM:SS, MM:SS, MM


@dataclass(frozen=True)
class JobSpec:
    """What one submitted job asks of SLURM, and the experiment it runs."""

    name: str
    exp_args: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    requeue: bool = False
    signal_seconds: int = 120


def batch_script(spec: JobSpec, repo: Path, python: Path, log: Path) -> str:
    """The sbatch script: SLURM's options, then `dvc exp run` in `repo` with this Python's tools."""
    options = [
        f"--job-name={JOB_PREFIX}{spec.name}",
        f"--nodes={spec.nodes}",
        "--ntasks-per-node=1",
        f"--output={log}",
        "--open-mode=append",  # a requeued job's log goes on in the same file
        f"--signal=B:TERM@{spec.signal_seconds}",
    ]
    options += [f"--gpus-per-node={spec.gpus_per_node}"] if spec.gpus_per_node else []
    options += [f"--cpus-per-task={spec.cpus_per_task}"] if spec.cpus_per_task else []
    options += [f"--time={spec.time}"] if spec.time else []
    options += [f"--partition={spec.partition}"] if spec.partition else []
    options += [f"--account={spec.account}"] if spec.account else []
    options += ["--requeue"] if spec.requeue else ["--no-requeue"]
    first = shlex.join(["dvc", "exp", "run", "--name", spec.name, *spec.exp_args])
    save = shlex.join(["dvc", "exp", "save", "--name", spec.name])
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {option}" for option in options),
        "set -uo pipefail",
        f"cd {shlex.quote(str(repo))}",
        f"export PATH={shlex.quote(str(python.parent))}:$PATH",
        'echo "lstm-textgen: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, restart ${SLURM_RESTART_COUNT:-0}"',
        'if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then',
        "    # exec: SIGTERM (preemption, the time limit) reaches DVC, which passes it to the stage",
        f"    exec {first}",
        "fi",
        "# requeued: the workspace holds this experiment's settings and its last checkpoint (`dvc exp run`",
        "# would check the baseline out first, and lose it): reproduce on from there, then save it as the",
        "# experiment; SIGTERM is passed on to DVC",
        "dvc repro & child=$!",
        "trap 'kill -TERM $child 2>/dev/null' TERM",
        'wait "$child"; status=$?',
        'if kill -0 "$child" 2>/dev/null; then wait "$child"; status=$?; fi',
        f'if [ "$status" -eq 0 ]; then {save}; status=$?; fi',
        'exit "$status"',
        "",
    ]
    return "\n".join(lines)


def tune_script(spec: JobSpec, workers: int, trials: int | None, repo: Path, python: Path, log: Path) -> str:
    """A search as one job of `workers` tasks: `lstm-textgen tune` on the batch host opens the study
    and its parent run, starts one worker per task with srun, and makes the best trial an experiment."""
    options = [
        f"--job-name={JOB_PREFIX}tune-{spec.name}",
        f"--ntasks={workers}",
        f"--output={log}",
        "--open-mode=append",
        f"--signal=B:TERM@{spec.signal_seconds}",
        "--no-requeue",  # a study goes on where it is: submit again to continue it
    ]
    options += [f"--nodes={spec.nodes}"] if spec.nodes > 1 else []
    options += [f"--gpus-per-task={spec.gpus_per_node}"] if spec.gpus_per_node else []
    options += [f"--cpus-per-task={spec.cpus_per_task}"] if spec.cpus_per_task else []
    options += [f"--time={spec.time}"] if spec.time else []
    options += [f"--partition={spec.partition}"] if spec.partition else []
    options += [f"--account={spec.account}"] if spec.account else []
    command = ["lstm-textgen", "tune", "--study", spec.name, "--workers", str(workers)]
    command += ["--trials", str(trials)] if trials else []
    return "\n".join(
        [
            "#!/bin/bash",
            *(f"#SBATCH {option}" for option in options),
            "set -euo pipefail",
            f"cd {shlex.quote(str(repo))}",
            f"export PATH={shlex.quote(str(python.parent))}:$PATH",
            'echo "lstm-textgen: search job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, $SLURM_NTASKS tasks"',
            "# exec: SIGTERM reaches tune, which stops its workers (their trials fail, the study goes on)",
            f"exec {shlex.join(command)}",
            "",
        ]
    )


def check_submittable(spec: JobSpec) -> None:
    """Each problem SLURM would only report later, or not at all, named before anything is submitted."""
    if shutil.which("sbatch") is None:
        raise UserError("sbatch is not on PATH: run `lstm-textgen slurm submit` on a SLURM login node")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", spec.name):
        raise UserError(f"--name {spec.name!r}: letters, digits, '_', '.' and '-' only (an experiment name)")
    if spec.nodes < 1 or spec.gpus_per_node < 0:
        raise UserError("--nodes must be at least 1 and --gpus-per-node at least 0")
    if spec.time is not None and not TIME_LIMIT.fullmatch(spec.time):
        raise UserError(f"--time {spec.time!r}: sbatch's form, e.g. 30 (minutes), 4:00:00 or 1-12:00:00")
    if spec.time is not None and minutes(spec.time) * 60 <= spec.signal_seconds:
        raise UserError(
            f"--time {spec.time} leaves no time to train before the SIGTERM asked for "
            f"{spec.signal_seconds} s ahead of it: ask for more time, or a smaller --signal-seconds"
        )
    device = requested_device(spec.exp_args)
    if device.startswith("cuda") and not spec.gpus_per_node:
        raise UserError(
            f"train.device is {device} but the job asks for no GPU: add --gpus-per-node N (one per "
            "train.processes worker), or -S train.device=cpu"
        )
    if spec.partition is not None:
        known = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, check=False)
        partitions = known.stdout.split()
        if known.returncode == 0 and spec.partition not in partitions:
            raise UserError(
                f"--partition {spec.partition!r} is not one of this cluster's: {', '.join(partitions)}"
            )


def requested_device(exp_args: list[str]) -> str:
    """`train.device` as the experiment will see it: a `-S train.device=...` given, else params.yaml's."""
    for setting in exp_args:
        if setting.startswith("train.device="):
            return setting.split("=", 1)[1]
    params = Path("params.yaml")
    if not params.is_file():
        return "auto"
    from lstm_textgen.params import load_params

    return load_params(params).train.device


def minutes(limit: str) -> float:
    """sbatch's time limit in minutes (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`)."""
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        hours, minutes_, seconds = [*parts, 0, 0][:3]
        return int(days) * 1440 + hours * 60 + minutes_ + seconds / 60
    if len(parts) == 3:
        return parts[0] * 60 + parts[1] + parts[2] / 60
    return parts[0] + (parts[1] / 60 if len(parts) == 2 else 0)


def submit(
    spec: JobSpec, repo: Path, dry_run: bool = False, tune: tuple[int, int | None] | None = None
) -> str | None:
    """Write the job's script (and print it on a dry run); submit it; its job id. `tune`: (workers,
    trials) of a search instead of an experiment."""
    folder = repo / JOBS_DIR / (f"tune-{spec.name}" if tune else spec.name)
    where = (repo.resolve(), Path(sys.executable), folder.resolve() / "slurm-%j.log")
    script = tune_script(spec, *tune, *where) if tune else batch_script(spec, *where)
    if dry_run:
        print(script, end="")
        return None
    check_submittable(spec)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.sbatch"
    path.write_text(script)
    done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UserError(f"sbatch refused the job: {done.stderr.strip() or done.stdout.strip()}")
    job = done.stdout.strip().split(";")[0]
    print(f"slurm: submitted job {job} ({JOB_PREFIX}{spec.name}); script {path}")
    print(f"slurm: log {folder / f'slurm-{job}.log'}; `lstm-textgen slurm status {job}` follows it")
    return job


@dataclass(frozen=True)
class JobState:
    job_id: str
    name: str
    state: str
    elapsed: str
    nodes: str


def project_jobs(job: str | None = None) -> list[JobState]:
    """This project's jobs SLURM still knows (squeue), or the one asked for (scontrol)."""
    command = ["squeue", "-h", "-o", "%i|%j|%T|%M|%N"] + (["-j", job] if job else [])
    listed = subprocess.run(command, capture_output=True, text=True, check=False)
    jobs = [JobState(*line.split("|")) for line in listed.stdout.splitlines() if line.count("|") == 4]
    if job and not jobs:  # finished: squeue forgets it, scontrol remembers it a while
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=False)
        fields = dict(re.findall(r"(\w+)=(\S+)", shown.stdout))
        if fields:
            state = [fields.get(key, "") for key in ("JobName", "JobState", "RunTime", "NodeList")]
            jobs = [JobState(job, *state)]
    return [j for j in jobs if j.name.startswith(JOB_PREFIX)]


def run_of_job(job_id: str) -> tuple[str, str, str] | None:
    """(MLflow run id, its status, its last logged step) of the run the job trains, if it has begun."""
    from mlflow.tracking import MlflowClient

    from lstm_textgen.tracking import store

    store.configure()
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`slurm.job_id` = '{job_id}'", max_results=1)
    if not runs:
        return None
    run = runs[0]
    steps = [m.step for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)[-1:]]
    return run.info.run_id, run.info.status, str(max(steps, default=0))


def status(job: str | None) -> None:
    jobs = project_jobs(job)
    if not jobs:
        print("slurm: no lstm-textgen job is queued or running" + (f" with id {job}" if job else ""))
        return
    for state in jobs:
        found = run_of_job(state.job_id)
        run = f"MLflow run {found[0]} {found[1]}, step {found[2]}" if found else "no MLflow run yet"
        experiment = state.name.removeprefix(JOB_PREFIX)
        print(f"{state.job_id}  {experiment}  {state.state}  {state.elapsed}  {state.nodes or '-'}  {run}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lstm-textgen slurm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    submitting = verbs.add_parser("submit", help="run `dvc exp run ARGS` as a batch job")
    submitting.add_argument("--name", help="the experiment's (and the job's) name; default exp-TIME")
    submitting.add_argument("--nodes", type=int, default=1)
    submitting.add_argument("--gpus-per-node", type=int, default=0)
    submitting.add_argument("--cpus-per-task", type=int)
    submitting.add_argument("--time", help="sbatch's time limit: 30, 4:00:00, 1-12:00:00")
    submitting.add_argument("--partition")
    submitting.add_argument("--account")
    submitting.add_argument("--requeue", action="store_true", help="requeue on preemption; it resumes")
    submitting.add_argument("--signal-seconds", type=int, default=120, help="SIGTERM this long before --time")
    submitting.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    submitting.add_argument("exp_args", nargs=argparse.REMAINDER, help="-- then `dvc exp run` arguments")
    searching = verbs.add_parser("submit-tune", help="an Optuna study as one job of --workers tasks")
    searching.add_argument("--workers", type=int, default=2, help="tune workers, one SLURM task each")
    searching.add_argument("--trials", type=int, help="tune.trials for this search")
    searching.add_argument("--study", help="tune.study (default params.yaml's)")
    for option in ("--nodes", "--gpus-per-node", "--cpus-per-task"):
        searching.add_argument(option, type=int, default=1 if option == "--nodes" else None)
    for option in ("--time", "--partition", "--account"):
        searching.add_argument(option)
    searching.add_argument("--signal-seconds", type=int, default=120)
    searching.add_argument("--dry-run", action="store_true")
    showing = verbs.add_parser("status", help="this project's jobs: state, MLflow run, last step")
    showing.add_argument("job", nargs="?")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.verb == "status":
        status(args.job)
        return
    if args.verb == "submit-tune":
        from lstm_textgen.params import load_params

        if args.workers < 1:
            raise UserError(f"--workers must be at least 1, got {args.workers}")
        study = args.study or load_params(Path("params.yaml")).tune.study
        spec = JobSpec(
            name=study,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node or 0,
            cpus_per_task=args.cpus_per_task,
            time=args.time,
            partition=args.partition,
            account=args.account,
            signal_seconds=args.signal_seconds,
        )
        submit(spec, Path.cwd(), dry_run=args.dry_run, tune=(args.workers, args.trials))
        return
    exp_args = args.exp_args[1:] if args.exp_args[:1] == ["--"] else args.exp_args
    spec = JobSpec(
        name=args.name or time.strftime("exp-%Y%m%d-%H%M%S"),
        exp_args=exp_args,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
        account=args.account,
        requeue=args.requeue,
        signal_seconds=args.signal_seconds,
    )
    submit(spec, Path.cwd(), dry_run=args.dry_run)


if __name__ == "__main__":
    from lstm_textgen.errors import run_main

    run_main(main)
