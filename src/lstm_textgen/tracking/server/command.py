"""`lstm-textgen server`: a lab's tracking service kept in one directory. A private PostgreSQL cluster
(Debian's package) holds the runs, the registry and the accounts; an MLflow tracking server on it
serves the artifacts itself (`--serve-artifacts`, so a model registered on one machine loads on any
other) and asks for a user name and password (MLflow's basic-auth app).

The directory holds everything to back up: `postgres/` (the cluster), `artifacts/` (unless the user
names another artifact store), `server.json` (ports, process), `secrets.json` (the database role's
password and the web session key, mode 0600) and the logs."""

from __future__ import annotations

import argparse
from argparse import RawDescriptionHelpFormatter as RawText
from pathlib import Path

from lstm_textgen.tracking import outbox
from lstm_textgen.tracking.server.backup import backup, restore
from lstm_textgen.tracking.server.lifecycle import Transport, client_variables, start, status, stop
from lstm_textgen.tracking.server.users import add_user, read_new_password


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser("lstm-textgen server", description=__doc__, formatter_class=RawText)
    verbs = top.add_subparsers(dest="action", required=True)
    for action, summary in (
        ("start", "start PostgreSQL and the MLflow server (idempotent)"),
        ("stop", "stop both; every run stays in --dir"),
        ("status", "what runs; with credentials set, close runs whose process died"),
        ("backup", "both databases and the artifacts in one file"),
        ("restore", "a new server directory from a backup file, started"),
    ):
        verb = verbs.add_parser(action, help=summary, description=summary)
        verb.add_argument("--dir", type=Path, required=True, help="the server's directory")
        if action in ("start", "restore"):
            verb.add_argument("--host", default="127.0.0.1", help="the address to listen on")
            verb.add_argument("--port", type=int, help="the tracking server's port (first start: 5000)")
        if action == "start":
            verb.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
            verb.add_argument("--tls-key", type=Path, help="... and this private key (PEM)")
            verb.add_argument(
                "--insecure-http",
                action="store_true",
                help="allow plain HTTP on a --host other than loopback (a network you trust)",
            )
            verb.add_argument("--artifacts", help="the artifact store, a folder or URI (DIR/artifacts)")
            verb.add_argument("--database-url", help="an existing PostgreSQL database, not a private one")
        if action == "backup":
            verb.add_argument("--to", type=Path, required=True, help="the backup file (.tar.gz)")
        if action == "restore":
            verb.add_argument("--from", dest="source", type=Path, required=True, help="a backup file")
    user = verbs.add_parser("add-user", help="an account (the admin's credentials in the environment)")
    user.add_argument("name")
    user.add_argument("--read-only", action="store_true", help="may list, compare, serve and score only")
    syncing = verbs.add_parser("sync", help="send the points a run kept while the server was away")
    syncing.add_argument(
        "--drop", action="append", metavar="RUN_ID", help="discard what this run kept instead (repeatable)"
    )
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.action == "start":
        transport = Transport(args.host, args.port, args.tls_cert, args.tls_key, args.insecure_http)
        state = start(args.dir, transport, args.artifacts, args.database_url)
        print(f"server: MLflow tracking server at {state.uri}\n{client_variables(state)}")
    elif args.action == "restore":
        state = restore(args.dir, args.source, args.host, args.port)
        print(f"server: restored {args.source} into {args.dir}, running at {state.uri}")
    elif args.action == "stop":
        stop(args.dir)
        print(f"server: stopped; the runs stay in {args.dir} (`lstm-textgen server start --dir {args.dir}`)")
    elif args.action == "add-user":
        add_user(args.name, read_new_password(args.name), args.read_only)
    elif args.action == "sync":
        outbox.sync(args.drop)
    elif args.action == "status":
        raise SystemExit(0 if status(args.dir) else 3)
    else:
        backup(args.dir, args.to)
