"""`lstm-textgen server`: the lab's tracking service (command.py), in parts: the directory
(layout.py), PostgreSQL (postgres.py), the MLflow process (process.py) and who it runs as
(service_account.py), start/stop/status (lifecycle.py), backups (backup.py), accounts (users.py)."""
