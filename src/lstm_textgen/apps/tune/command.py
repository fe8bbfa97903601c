"""`lstm-textgen tune`: which settings are best for this corpus and this budget. An Optuna study of
real training runs on the prepared corpus (`dvc repro prepare`), shared by every worker that names the
same study and storage, on this machine (`--workers K`) or others; at the end the best params run
once more as a DVC experiment, which registers a model version.

    lstm-textgen tune [--study NAME] [--trials N] [--minutes M] [--workers K] [--trial-minutes T]
    lstm-textgen tune show [--study NAME]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lstm_textgen.apps.tune.trial import TuneFiles
from lstm_textgen.params import Params, load_params, with_settings

# flag: the `tune` key it overrides
OVERRIDES = {
    "study": "tune.study",
    "trials": "tune.trials",
    "minutes": "tune.minutes",
    "workers": "tune.workers",
    "trial_minutes": "tune.trial_minutes",
}


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
    params, files = resolved(args), TuneFiles(Path.cwd())
    if args.action == "show":
        from lstm_textgen.apps.tune.report import show
        from lstm_textgen.apps.tune.study import storage_url

        show(params, files, storage_url(params))
        return
    from lstm_textgen.apps.tune.study import run_study, storage_url, worker

    if args.action == "worker":
        worker(
            params, files, storage=storage_url(params), parent_run_id=args.parent_run, deadline=args.deadline
        )
    else:
        run_study(params, files, [a for a in raw if a != "run"])
