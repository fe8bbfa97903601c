"""`lstm-textgen VERB ...`: the one command, like `dvc` and `mlflow`. Each verb is a module with its
own `main(argv)` and `--help`; a verb's module is imported only when it runs, so `lstm-textgen params`
or `--help` starts without torch or mlflow."""

from __future__ import annotations

import importlib
import sys

from lstm_textgen.errors import run_main

# verb: (module, what it does)
VERBS = {
    "sample": (
        "lstm_textgen.apps.sample",
        "continue prompts with a trained model (a checkpoint or models:/)",
    ),
    "score": (
        "lstm_textgen.apps.score",
        "bits per character, perplexity and log-probabilities of a text",
    ),
    "serve": (
        "lstm_textgen.apps.serve",
        "an OpenAI-compatible, streaming HTTP API on the model (/v1/completions)",
    ),
    "demo": ("lstm_textgen.apps.demo", "the web page: streaming generation and coloured scores (make demo)"),
    "plots": ("lstm_textgen.apps.plots", "DVC's plots as a page that renders offline (make plots)"),
    "compare": ("lstm_textgen.tracking.compare", "the MLflow runs as a table, and val loss against time"),
    "ui": ("lstm_textgen.apps.ui", "MLflow's UI on this repository's store, with the link to its runs table"),
    "presets": ("lstm_textgen.apps.presets", "the notebook presets as `dvc exp run` commands: list or run"),
    "tune": (
        "lstm_textgen.apps.tune.command",
        "an Optuna study of real training runs: run, or show the leaderboard",
    ),
    "server": (
        "lstm_textgen.tracking.server.command",
        "a lab's tracking server: PostgreSQL, MLflow, accounts",
    ),
    "slurm": ("lstm_textgen.apps.slurm", "the pipeline as a SLURM batch job: submit (it resumes), status"),
    "params": ("lstm_textgen.apps.params_table", "the table of every params.yaml key (docs/params.md)"),
    "code-deps": ("lstm_textgen.apps.code_deps", "check or rewrite the code each dvc.yaml stage depends on"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [f"  {verb:<{width}}  {summary}" for verb, (_, summary) in VERBS.items()]
    return (
        "usage: lstm-textgen VERB [ARGS...]   (lstm-textgen VERB --help for a verb's options)\n\n"
        "The pipeline itself runs with `dvc repro` (or `make repro`); these verbs use what it made.\n\n"
        "verbs:\n" + "\n".join(lines)
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        print(f"lstm-textgen: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(VERBS[verb][0]).main(rest)


def entry_point() -> None:
    run_main(main)


if __name__ == "__main__":
    entry_point()
