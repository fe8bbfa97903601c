"""`lstm-textgen ui` (`make ui`): MLflow's UI on this repository's store, and the link to its runs table.

MLflow 3 opens an experiment on its GenAI pages (traces, latency) in a fresh browser, whatever the
experiment's kind tag says; `#/experiments/<id>/runs?workflowType=machine_learning` lands on the runs
table, where params, metrics and curves compare. With MLFLOW_TRACKING_URI set to a tracking server, the
link points there and no UI is started."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from lstm_textgen.errors import UserError
from lstm_textgen.network import wait_until_answers
from lstm_textgen.tracking import store

UI_START_S = 120.0  # MLflow's UI imports a lot before its port opens


def runs_table_link(base_url: str, experiment_id: str) -> str:
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lstm-textgen ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    mlflow = store.configure()
    experiment_id = mlflow.get_experiment_by_name(store.experiment_name()).experiment_id
    uri = store.tracking_uri()
    if store.is_server(uri):
        print(f"ui: the runs table: {runs_table_link(uri, experiment_id)}")
        return
    base = f"http://{args.host}:{args.port}"
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", args.host, "--port", str(args.port), "--workers", "1"]
    ui = subprocess.Popen(command, env={**store.SERVER_DEFAULTS, **os.environ})
    try:
        try:
            wait_until_answers(base, UI_START_S, ui)
        except TimeoutError as exc:
            raise UserError(f"ui: MLflow's UI did not start: {exc}") from None
        print(f"ui: the runs table: {runs_table_link(base, experiment_id)}", flush=True)
        ui.wait()
    finally:  # Ctrl-C or SIGTERM here: the UI goes with us
        if ui.poll() is None:
            ui.terminate()
            ui.wait()
