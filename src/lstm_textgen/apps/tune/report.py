"""What a study found: the leaderboard (completed trials by value, then the others), the best trial
as a `dvc exp run` command, and Optuna's plots, kept beside the study and in its MLflow run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lstm_textgen.errors import UserError
from lstm_textgen.network import without_password
from lstm_textgen.params import Params

if TYPE_CHECKING:
    import optuna

    from lstm_textgen.apps.tune.trial import TuneFiles


def experiment_settings(params: Params, best: dict[str, Any]) -> list[str]:
    """`-S key=value` arguments: the best trial's values and its budget."""
    from lstm_textgen.train.search import trial_budget

    settings = {**best, **trial_budget(params.tune)}
    return [arg for key, value in settings.items() for arg in ("-S", f"{key}={value}")]


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


def show(params: Params, files: TuneFiles, storage: str) -> None:
    import optuna

    from lstm_textgen.tracking import store

    try:
        study = optuna.load_study(study_name=params.tune.study, storage=storage)
    except KeyError:
        raise UserError(
            f"no study {params.tune.study!r} in {without_password(storage)} (`lstm-textgen tune` starts one)"
        ) from None
    print(leaderboard(study, params))
    made = plots(study, files.study_dir(params.tune.study))
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
