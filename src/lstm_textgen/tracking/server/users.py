"""`server add-user`: MLflow accounts, made with the admin's credentials (READ, or EDIT on the
experiment and every registered model)."""

from __future__ import annotations

import sys

from lstm_textgen.errors import UserError
from lstm_textgen.tracking import store
from lstm_textgen.tracking.server.layout import MIN_PASSWORD


def add_user(name: str, password: str, read_only: bool) -> None:
    """A new account on the server of MLFLOW_TRACKING_URI, made with the admin's credentials
    (MLFLOW_TRACKING_USERNAME / _PASSWORD). Every account may read; one that trains gets EDIT on
    the experiment and on every registered model, those made later included."""
    from mlflow.server import get_app_client

    uri = store.tracking_uri()
    if not store.is_server(uri):
        raise UserError("set MLFLOW_TRACKING_URI to the tracking server's http:// address first")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password of {name!r} must have at least {MIN_PASSWORD} characters")
    mlflow = store.configure()
    admin = get_app_client("basic-auth", tracking_uri=uri)
    admin.create_user(name, password)
    if not read_only:
        experiment = mlflow.get_experiment_by_name(store.experiment_name()).experiment_id
        admin.grant_user_permission(name, "experiment", experiment, "EDIT")
        admin.grant_user_permission(name, "registered_model", "*", "EDIT")
    print(f"server: account {name!r} created ({'READ' if read_only else 'EDIT'} on {uri})")


def read_new_password(name: str) -> str:
    """From the terminal without echo, or the first line of stdin (scripts)."""
    import getpass

    if sys.stdin.isatty():
        return getpass.getpass(f"password for {name}: ")
    return sys.stdin.readline().rstrip("\n")
