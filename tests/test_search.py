"""The search's pure parts, without training: the leaderboard a study prints."""

from __future__ import annotations

from pathlib import Path

import optuna

from lstm_textgen.apps.tune.report import leaderboard
from lstm_textgen.params import load_params

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_leaderboard_ranks_complete_trials_and_lists_pruned_ones_after_them() -> None:
    """A pruned trial's value is its last periodic validation loss, not the objective: it must not
    rank above the complete trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    distribution = {"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    for lr, value in ((0.01, 2.1), (0.003, 1.9)):
        study.add_trial(
            optuna.trial.create_trial(params={"train.lr": lr}, distributions=distribution, value=value)
        )
    pruned = optuna.trial.create_trial(
        params={"train.lr": 0.05},
        distributions=distribution,
        state=optuna.trial.TrialState.PRUNED,
        intermediate_values={1000: 1.6},
    )
    study.add_trial(pruned)
    shown = leaderboard(study, load_params(REPO_ROOT / "params.yaml"))
    rows = [line for line in shown.splitlines() if line.startswith("| ") and "state" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "0", "2"]
    assert "| 2 | PRUNED | (step 1000: 1.6000) |" in rows[2]
    assert "best: trial 1, 1.9000" in shown and "dvc exp run -S train.lr=0.003" in shown
