"""`lstm-textgen serve [MODEL]`: the model behind an OpenAI-compatible, streaming HTTP API.

    lstm-textgen serve                                   # params.yaml's model, its champion
    lstm-textgen serve models:/lstm-textgen-shakespeare-char/3 --port 8000
    lstm-textgen serve data/model/model.pt               # a checkpoint, no registry needed

Applications talk to it as to any LLM server: the `openai` client with base_url
http://HOST:PORT/v1, LangChain, curl -N with `"stream": true`. `mlflow models serve` stays the
standard way to serve the registered pyfunc; this server feeds the same batcher without MLflow's
per-request work (docs/serving.md compares them). LSTM_TEXTGEN_API_KEYS (keys separated by commas,
or a file of keys, one per line) makes every /v1 call need `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lstm_textgen.errors import UserError

API_KEYS_VARIABLE = "LSTM_TEXTGEN_API_KEYS"
MODEL_VARIABLE = "LSTM_TEXTGEN_SERVE_MODEL"  # what each of --workers' processes loads
DEVICE_VARIABLE = "LSTM_TEXTGEN_SERVE_DEVICE"
DEMO_VARIABLE = "LSTM_TEXTGEN_SERVE_DEMO"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstm-textgen serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model",
        nargs="?",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a checkpoint path "
        "(default: models:/NAME@champion, NAME as params.yaml's register section gives it)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to be reached from other machines")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="processes, each with the model loaded")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="for the default MODEL")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="also the demo's web page at /demo/, on the same batcher (with API keys: a key is its password)",
    )
    return parser


def default_source(params_file: Path) -> str:
    from lstm_textgen.params import load_params
    from lstm_textgen.tracking.registry import default_model_name

    params = load_params(params_file)
    name = params.register_.model_name or default_model_name(Path(params.data.corpus).stem, params.data.level)
    return f"models:/{name}@champion"


def read_api_keys(env: Mapping[str, str] = os.environ) -> frozenset[str]:
    """The keys of LSTM_TEXTGEN_API_KEYS: a file of keys (one a line, # comments), or the keys
    themselves separated by commas; none set, no key is asked for."""
    value = env.get(API_KEYS_VARIABLE, "").strip()
    if not value:
        return frozenset()
    path = Path(value)
    if path.is_file():
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        keys = frozenset(line for line in lines if line)
        if not keys:
            raise UserError(f"{API_KEYS_VARIABLE} names {path}, which holds no key (one per line)")
        return keys
    keys = frozenset(part.strip() for part in value.split(",") if part.strip())
    if any(len(key) < 8 for key in keys):
        raise UserError(
            f"{API_KEYS_VARIABLE}: every key must have at least 8 characters (or name a file of keys)"
        )
    return keys


def model_card(source: str, loaded: Any) -> Any:
    """What /v1/models says: the registered name and version where the source is a registry URI."""
    from lstm_textgen.serving.openai_app import ModelCard
    from lstm_textgen.tracking.registry import default_model_name

    data = loaded.params.data
    corpus, level = Path(data.corpus).stem, data.level
    name, version = default_model_name(corpus, level), None
    if source.startswith("models:/"):
        name, _, which = source.removeprefix("models:/").partition("@")
        if which:  # an alias: the version it points at now
            from mlflow import MlflowClient

            version = MlflowClient().get_model_version_by_alias(name, which).version
        else:
            name, _, version = name.partition("/")
    return ModelCard(name, source, version, corpus, level, int(time.time()))


def build_app(source: str, device: str, api_keys: frozenset[str]) -> Any:
    from lstm_textgen.devices import resolve_device
    from lstm_textgen.serving.limits import ServingOptions
    from lstm_textgen.serving.openai_app import create_app
    from lstm_textgen.tracking.registry import load_source

    options = ServingOptions.from_environment()
    loaded = load_source(source, resolve_device(device))
    return create_app(loaded, model_card(source, loaded), options, api_keys)


def mount_demo(app: Any, source: str, api_keys: frozenset[str]) -> Any:
    """The demo's page (`lstm-textgen demo`) at /demo/, generating in the API's own batcher: one
    batch for the page's streams and the API's requests. With API keys, any user name and a key log in."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported
    import gradio as gr

    from lstm_textgen.apps.demo import build_page
    from lstm_textgen.apps.demo_models import ModelCache, ModelEntry

    card = app.state.card
    label = f"{card.id} v{card.version}" if card.version else card.id
    models = ModelCache.holding(source, app.state.loaded, app.state.batcher)
    page = build_page([ModelEntry(source, label)], models).queue(default_concurrency_limit=4)

    def by_key(_user: str, password: str) -> bool:
        return password in api_keys

    auth = by_key if api_keys else None
    page_options = {"ssr_mode": False, "pwa": False, "mcp_server": False}
    return gr.mount_gradio_app(app, page, path="/demo", auth=auth, **page_options)


def app_from_environment() -> Any:
    """The app of one of --workers' processes (uvicorn imports this factory in each)."""
    source, keys = os.environ[MODEL_VARIABLE], read_api_keys()
    app = build_app(source, os.environ.get(DEVICE_VARIABLE, "auto"), keys)
    return mount_demo(app, source, keys) if os.environ.get(DEMO_VARIABLE) == "1" else app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    source = args.model or default_source(args.params)
    keys = read_api_keys()
    if args.host not in LOOPBACK and not keys:
        print(
            f"serve: WARNING: anyone who reaches {args.host}:{args.port} may use the model; set "
            f"{API_KEYS_VARIABLE} to ask for a key",
            file=sys.stderr,
        )
    where = f"http://{args.host}:{args.port}"
    if args.workers == 1:
        app = build_app(source, args.device, keys)
        card = app.state.card
        version = f" version {card.version}" if card.version else ""
        if args.demo:
            app = mount_demo(app, source, keys)
        print(
            f"serve: {card.id}{version} ({source}) at {where}/v1, OpenAI-compatible; {where}/metrics"
            + (f"; the demo page at {where}/demo/" if args.demo else ""),
            flush=True,
        )
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return
    os.environ[MODEL_VARIABLE], os.environ[DEVICE_VARIABLE] = source, args.device
    os.environ[DEMO_VARIABLE] = "1" if args.demo else "0"
    print(f"serve: {source} in {args.workers} processes at {where}/v1 (OpenAI-compatible)", flush=True)
    uvicorn.run(
        "lstm_textgen.apps.serve:app_from_environment",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
    )


if __name__ == "__main__":
    from lstm_textgen.errors import run_main

    run_main(main)
