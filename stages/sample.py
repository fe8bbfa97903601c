"""DVC stage `sample`: best checkpoint + sample.* params -> data/samples/samples.{json,txt}, logged to
the training run in MLflow."""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow

from lstm_textgen.devices import resolve_device
from lstm_textgen.errors import run_main
from lstm_textgen.files import read_json, write_json, write_text
from lstm_textgen.inference.generation import sample_texts
from lstm_textgen.model.checkpoint import load_model
from lstm_textgen.params import load_params
from lstm_textgen.tracking import liveness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", type=Path, default=Path("data/model/model.pt"))
    parser.add_argument("--train-metrics", type=Path, default=Path("metrics/train.json"))
    parser.add_argument("--out", type=Path, default=Path("data/samples"))
    args = parser.parse_args()

    params = load_params(args.params)
    loaded = load_model(args.model, resolve_device(params.train.device))
    sp = params.sample
    texts = sample_texts(
        loaded.model,
        loaded.vocab,
        sp.prompts,
        length=sp.length,
        sampling=sp.sampling(),
        unknown=sp.unknown,
        replacement=sp.replacement,
    )
    settings = sp.model_dump(exclude={"prompts"})
    records = [{"prompt": p, "settings": settings, "text": t} for p, t in zip(sp.prompts, texts, strict=True)]
    write_json(args.out / "samples.json", records)
    readable = "\n\n".join(f"=== prompt: {r['prompt']!r} ===\n{r['prompt']}{r['text']}" for r in records)
    write_text(args.out / "samples.txt", readable + "\n")
    run_id = read_json(args.train_metrics)["mlflow_run_id"]
    with liveness.active_run(run_id=run_id):
        mlflow.log_artifacts(str(args.out), artifact_path="samples")
    print(readable[:1500])


if __name__ == "__main__":
    run_main(main)
