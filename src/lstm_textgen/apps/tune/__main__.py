"""`python -m lstm_textgen.apps.tune`: how `tune` starts its workers."""

import os

from lstm_textgen.apps.tune.command import main
from lstm_textgen.errors import run_main

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
run_main(main)
