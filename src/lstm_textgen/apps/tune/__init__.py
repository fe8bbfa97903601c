"""`lstm-textgen tune`: an Optuna study of real training runs. `command.py` the command line,
`study.py` the study and its workers, `trial.py` one trial (a training through the one training
entry), `report.py` the leaderboard and plots."""
