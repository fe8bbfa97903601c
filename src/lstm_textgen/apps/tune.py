"""`lstm-textgen tune`: which settings are best for this corpus and this budget. An Optuna study of
real training runs on the prepared corpus (`dvc repro prepare`), shared by every worker that names the
same study and storage, on this machine (`--workers K`) or others:

- each trial is a training run with the trial's params and budget, an MLflow run nested under the
  study's parent run (tags `tune.study`, `tune.trial`, `tune.state`);
- its periodic validation loss goes to the pruner, which stops a lagging trial at that evaluation
  (state PRUNED, no traceback), freeing the worker;
- a worker killed outright leaves its trial to the heartbeat (marked FAIL after twice
  `tune.heartbeat_seconds`); SIGTERM or Ctrl-C ends the trial as failed and the worker cleanly;
- at the end the best params run once more as a DVC experiment, which registers a model version.

    lstm-textgen tune [--study NAME] [--trials N] [--minutes M] [--workers K] [--trial-minutes T]
    lstm-textgen tune show [--study NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lstm_textgen.errors import Terminated, UserError
from lstm_textgen.network import without_password
from lstm_textgen.params import Params, load_params, with_settings

if TYPE_CHECKING:
    import optuna

# flag: the `tune` key it overrides
OVERRIDES = {
    "study": "tune.study",
    "trials": "tune.trials",
    "minutes": "tune.minutes",
    "workers": "tune.workers",
    "trial_minutes": "tune.trial_minutes",
}


# every trial a worker took (a WAITING one is only enqueued)
STARTED = ("RUNNING", "COMPLETE", "PRUNED", "FAIL")


@dataclass(frozen=True)
class Paths:
    """What the trials read (the pipeline's prepared corpus) and where they write."""

    root: Path

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def corpus_info(self) -> Path:
        return self.root / "data" / "raw" / "corpus.json"

    def study_dir(self, study: str) -> Path:
        return self.root / "data" / "tune" / study


STORAGE_VARIABLE = "LSTM_TEXTGEN_TUNE_STORAGE"


def storage_url(params: Params) -> str:
    """The study's storage: LSTM_TEXTGEN_TUNE_STORAGE (a URL with its password, kept out of
    params.yaml as MLflow keeps its credentials out), else `tune.storage`, else optuna.db beside the
    local MLflow store. Shown only through `without_password`."""
    from lstm_textgen.tracking import store

    if os.environ.get(STORAGE_VARIABLE):
        return os.environ[STORAGE_VARIABLE]
    if params.tune.storage:
        return params.tune.storage
    if store.is_server(store.tracking_uri()):
        print(
            "tune: the study is kept in optuna.db on this machine; to share it with other machines, "
            "set tune.storage to a database they all reach (docs/team.md)",
            file=sys.stderr,
        )
    return f"sqlite:///{store.repository_root() / 'optuna.db'}"


# --- one trial ------------------------------------------------------------------------------------


class Trainer:
    """Runs trials in this process: the prepared corpus is loaded once per worker."""

    def __init__(self, params: Params, paths: Paths, parent_run_id: str) -> None:
        from lstm_textgen.data.dataset import load_dataset
        from lstm_textgen.files import read_json

        if not (paths.prepared / "vocab.json").exists():
            raise UserError(f"no prepared corpus in {paths.prepared}: run `dvc repro prepare` first")
        self.params, self.paths, self.parent_run_id = params, paths, parent_run_id
        self.stopped_by: BaseException | None = None  # Ctrl-C or SIGTERM, for the worker's exit code
        self.dataset = load_dataset(paths.prepared)
        self.corpus = read_json(paths.corpus_info)

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        from lstm_textgen.train.search import suggest, trial_params

        settings = suggest(trial, self.params.tune.space)
        try:
            params = trial_params(self.params, settings)
        except UserError as exc:  # a combination the params refuse (e.g. a float for an int key)
            raise optuna.TrialPruned(f"params refused: {exc}") from None
        started = time.monotonic()
        try:
            value, pruned_at = self.train(trial, params)
        except (KeyboardInterrupt, Terminated) as exc:
            self.stopped_by = exc
            trial.set_user_attr("stopped", f"{type(exc).__name__}: {exc}")
            raise KeyboardInterrupt from None  # Optuna marks the trial FAIL, then the worker stops
        except Exception as exc:  # Optuna marks it FAIL and goes on; `said` prints why, in one line
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
            raise
        trial.set_user_attr("minutes", (time.monotonic() - started) / 60)
        if pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at step {pruned_at}")
        return value

    def train(self, trial: optuna.Trial, params: Params) -> tuple[float, int | None]:
        from lstm_textgen.tracking.training_run import training_run
        from lstm_textgen.train.checkpointer import Checkpointer
        from lstm_textgen.train.distributed import World
        from lstm_textgen.train.loop import train

        tune, world = self.params.tune, World.from_env()
        out = self.paths.study_dir(tune.study) / f"trial-{trial.number}"
        checkpointer = Checkpointer(out / "model.pt", out / "last.pt")
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "tune.study": tune.study,
            "tune.trial": str(trial.number),
        }
        pruned_at: int | None = None
        with (
            world.running(params.train.device) as device,
            training_run(
                params,
                self.corpus,
                len(self.dataset.vocab),
                device,
                world,
                None,
                {},
                name=f"{tune.study} trial {trial.number}",
                extra_tags=tags,
            ) as run,
        ):

            def report(record: dict[str, float]) -> bool:
                nonlocal pruned_at
                run.log_evaluation(record)
                trial.report(record["val_loss"], int(record["step"]))
                if trial.should_prune():
                    pruned_at = int(record["step"])
                return pruned_at is not None

            result = train(
                self.dataset.splits,
                self.dataset.vocab,
                params,
                checkpointer.best_path,
                checkpointer.last_path,
                on_eval=report,
                world=world,
                labels=run.labels,
            )
            run.finish(result)
            best = checkpointer.best_path
            value = math.nan if pruned_at is not None else self.objective(params, result, best, device)
            state = "PRUNED" if pruned_at is not None else "COMPLETE"
            assert run.outbox is not None
            run.outbox.set_tags({"tune.state": state})
            if pruned_at is None:
                run.outbox.log_metrics({"tune.objective": value})
        return value, pruned_at

    def objective(self, params: Params, result: Any, best: Path, device: Any) -> float:
        """What the study minimises (`tune.objective`); evaluated in float32, as the evaluate stage."""
        if params.tune.objective == "window_val_loss":
            return float(result.window_val_loss_best)
        from lstm_textgen.inference.evaluation import evaluate_stateful
        from lstm_textgen.model.checkpoint import load_model

        loaded = load_model(best, device)
        figures = evaluate_stateful(
            loaded.model, self.dataset.splits["val"], params.evaluate.seq_len, params.evaluate.batch_size
        )
        per_token = self.dataset.characters_per_token("val") or 1.0
        return float(figures["bits_per_token"]) / per_token


# --- a worker and the study -----------------------------------------------------------------------


def worker(params: Params, paths: Paths, storage: str, parent_run_id: str, deadline: float | None) -> None:
    """Trials until the study has `tune.trials` of them or the deadline passes."""
    import optuna

    from lstm_textgen.train.search import open_study

    study = open_study(params, storage)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial: one line (said), no traceback
    started = tuple(optuna.trial.TrialState[name] for name in STARTED)
    if params.tune.trials and len(study.get_trials(deepcopy=False, states=started)) >= params.tune.trials:
        print(f"tune: study {params.tune.study!r} has its {params.tune.trials} trials (--trials for more)")
        return
    stop = [optuna.study.MaxTrialsCallback(params.tune.trials, states=started)] if params.tune.trials else []
    timeout = None if deadline is None else max(0.0, deadline - time.time())
    trainer = Trainer(params, paths, parent_run_id)
    try:
        study.optimize(
            trainer,
            timeout=timeout,
            callbacks=[*stop, said],
            catch=(Exception,),  # a failing trial (a bad combination) is FAIL; the worker goes on
            gc_after_trial=True,
        )
    except KeyboardInterrupt:
        if isinstance(trainer.stopped_by, Terminated):  # exit 143, as SIGTERM is reported
            raise trainer.stopped_by from None
        raise


def said(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line per finished trial, as the worker's log."""
    reason = trial.user_attrs.get("error") or trial.user_attrs.get("stopped") or ""
    value = f"{trial.value:.4f}" if trial.value is not None else ""
    print(f"tune: trial {trial.number} {trial.state.name.lower()} {value}{reason}".rstrip(), flush=True)


def parent_run(params: Params, study: optuna.Study) -> str:
    """The study's MLflow run, made by whoever opens the study first; each trial's run nests under it."""
    from lstm_textgen.tracking import store

    known = study.user_attrs.get("mlflow_parent_run_id")
    if known and store.existing_run(known):
        return str(known)
    mlflow = store.configure()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(store.experiment_name()).experiment_id
    tags = {"tune.study": params.tune.study, "tune.role": "study", "mlflow.note.content": study_note(params)}
    run_id = client.create_run(experiment, run_name=f"study {params.tune.study}", tags=tags).info.run_id
    study.set_user_attr("mlflow_parent_run_id", run_id)
    return run_id


def study_note(params: Params) -> str:
    space = ", ".join(params.tune.space)
    return (
        f"Optuna study `{params.tune.study}`: {params.tune.sampler} sampler, {params.tune.pruner} pruner, "
        f"searching {space}. Its trials are the runs nested below; `lstm-textgen tune show` ranks them."
    )


def start_workers(count: int, argv: list[str]) -> list[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "lstm_textgen.apps.tune", "worker", *argv]
    return [subprocess.Popen(command) for _ in range(count)]


def wait_for(workers: list[subprocess.Popen[bytes]]) -> None:
    """Until every worker ends; a stop request to this process goes on to the workers."""
    try:
        for process in workers:
            process.wait()
    except BaseException:
        for process in workers:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in workers:
            process.wait()
        raise


def best_as_experiment(params: Params, study: optuna.Study) -> None:
    """The best trial's params as a DVC experiment (`dvc exp show` lists it), which trains, evaluates
    and registers a version that competes for `champion` like any other."""
    from optuna.trial import TrialState

    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        print("tune: no trial completed; no experiment to run")
        return
    best = study.best_trial
    name = f"tune-{params.tune.study}-{best.number}"
    listed = subprocess.run(
        ["dvc", "exp", "list", "--name-only"], capture_output=True, text=True, check=False
    )
    if name in listed.stdout.split():
        print(f"tune: the best trial ({best.number}) is already the DVC experiment {name}")
        return
    command = ["dvc", "exp", "run", "--temp", "-n", name, *experiment_settings(params, best.params)]
    print(f"tune: the best trial, {best.number}, as a DVC experiment: {' '.join(command)}", flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        raise UserError(f"the DVC experiment of the best trial failed; run it again: {' '.join(command)}")


def experiment_settings(params: Params, best: dict[str, Any]) -> list[str]:
    """`-S key=value` arguments: the best trial's values and its budget."""
    settings = dict(best)
    if params.tune.trial_minutes is not None:
        settings["train.max_minutes"] = params.tune.trial_minutes
    if params.tune.trial_steps is not None:
        settings["train.max_steps"] = params.tune.trial_steps
    return [arg for key, value in settings.items() for arg in ("-S", f"{key}={value}")]


def run_study(params: Params, argv: list[str]) -> None:
    import optuna

    from lstm_textgen.train.search import open_study

    storage = storage_url(params)
    study = open_study(params, storage)  # the schema and the study exist before any worker starts
    parent = parent_run(params, study)
    deadline = time.time() + 60 * params.tune.minutes if params.tune.minutes else None
    extra = ["--parent-run", parent, *(["--deadline", str(deadline)] if deadline else [])]
    print(
        f"tune: study {params.tune.study!r} in {without_password(storage)}: {params.tune.workers} "
        f"worker(s), up to {params.tune.trials or 'unlimited'} trials; MLflow run {parent}",
        flush=True,
    )
    wait_for(start_workers(params.tune.workers, [*argv, *extra]))
    study = optuna.load_study(study_name=params.tune.study, storage=storage)
    print(leaderboard(study, params))
    if params.tune.experiment:
        best_as_experiment(params, study)


# --- show -----------------------------------------------------------------------------------------


def leaderboard(study: optuna.Study, params: Params) -> str:
    from optuna.trial import TrialState

    rows = ["| trial | state | value | minutes | params |", "|---|---|---|---|---|"]
    # completed trials by value; the others after them: a pruned trial's value is its last periodic
    # validation loss (nats), not the objective
    order = sorted(
        study.trials,
        key=lambda t: (
            t.state != TrialState.COMPLETE,
            t.value if t.state == TrialState.COMPLETE else 0,
            t.number,
        ),
    )
    for t in order:
        value = f"{t.value:.4f}" if t.state == TrialState.COMPLETE and t.value is not None else ""
        if t.state == TrialState.PRUNED and t.intermediate_values:
            step = max(t.intermediate_values)
            value = f"(step {step}: {t.intermediate_values[step]:.4f})"
        minutes = t.user_attrs.get("minutes")
        took = "" if minutes is None else f"{minutes:.1f}"
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        rows.append(f"| {t.number} | {t.state.name} | {value} | {took} | {shown} |")
    counts = {state.name: sum(t.state == state for t in study.trials) for state in TrialState}
    summary = ", ".join(f"{n} {name.lower()}" for name, n in counts.items() if n)
    lines = [f"Study {study.study_name} ({params.tune.objective}, lower is better): {summary}", "", *rows]
    if counts["COMPLETE"]:
        best = study.best_trial
        lines += ["", f"best: trial {best.number}, {best.value:.4f}; as an experiment:"]
        lines += ["  dvc exp run " + " ".join(experiment_settings(params, best.params))]
    return "\n".join(lines)


def plots(study: optuna.Study, folder: Path) -> list[Path]:
    """The optimisation history, the intermediate values and the params' importances as PNG."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as optuna_plots

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    drawings = {
        "history.png": optuna_plots.plot_optimization_history,
        "intermediate.png": optuna_plots.plot_intermediate_values,
        "importances.png": optuna_plots.plot_param_importances,
    }
    for name, draw in drawings.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                axes = draw(study)
            except (ValueError, RuntimeError):  # e.g. importances need two completed trials
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        figure.savefig(folder / name, dpi=100)
        made.append(folder / name)
    return made


def show(params: Params, paths: Paths) -> None:
    import optuna

    from lstm_textgen.tracking import store

    storage = storage_url(params)
    try:
        study = optuna.load_study(study_name=params.tune.study, storage=storage)
    except KeyError:
        raise UserError(
            f"no study {params.tune.study!r} in {without_password(storage)} (`lstm-textgen tune` starts one)"
        ) from None
    print(leaderboard(study, params))
    made = plots(study, paths.study_dir(params.tune.study))
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if made and parent and store.existing_run(parent):
        client = store.configure().MlflowClient()
        for path in made:
            client.log_artifact(parent, str(path), artifact_path="tune")
    if made:
        print(
            f"\nplots: {', '.join(str(p) for p in made)}"
            + (f" (and in MLflow run {parent})" if parent else "")
        )


# --- the command ----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        "lstm-textgen tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    top.add_argument("action", nargs="?", choices=["run", "show", "worker"], default="run")
    top.add_argument("--params", type=Path, default=Path("params.yaml"))
    top.add_argument("--study", help="tune.study for this call")
    top.add_argument("--trials", type=int, help="tune.trials for this call")
    top.add_argument("--minutes", type=float, help="tune.minutes for this call")
    top.add_argument("--workers", type=int, help="tune.workers: processes on this machine")
    top.add_argument("--trial-minutes", type=float, help="tune.trial_minutes for this call")
    top.add_argument("--parent-run", help=argparse.SUPPRESS)
    top.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return top


def resolved(args: argparse.Namespace) -> Params:
    params = load_params(args.params)
    changes = {key: getattr(args, flag) for flag, key in OVERRIDES.items() if getattr(args, flag) is not None}
    return with_settings(params, changes) if changes else params


def main(argv: list[str] | None = None) -> None:
    raw = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(raw)
    params, paths = resolved(args), Paths(Path.cwd())
    if args.action == "show":
        show(params, paths)
    elif args.action == "worker":
        worker(params, paths, storage_url(params), args.parent_run, args.deadline)
    else:
        run_study(params, [a for a in raw if a != "run"])


if __name__ == "__main__":
    from lstm_textgen.errors import run_main

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    run_main(main)
