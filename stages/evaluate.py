"""DVC stage `evaluate`: best checkpoint + val/test splits -> metrics/evaluate.json, logged to the
training run in MLflow (loss, perplexity, bits per token and per character, accuracy; stateful and
stateless). Bits per character use the characters each split's tokens stand for (splits.json)."""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow

from lstm_textgen.data.dataset import load_dataset
from lstm_textgen.devices import resolve_device
from lstm_textgen.errors import UserError, run_main
from lstm_textgen.files import read_json, write_json
from lstm_textgen.inference.evaluation import evaluate_splits
from lstm_textgen.model.checkpoint import load_model
from lstm_textgen.params import flatten, load_params
from lstm_textgen.tracking import store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", type=Path, default=Path("data/model/model.pt"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--train-metrics", type=Path, default=Path("metrics/train.json"))
    parser.add_argument("--out", type=Path, default=Path("metrics/evaluate.json"))
    args = parser.parse_args()

    params = load_params(args.params)
    device = resolve_device(params.train.device)
    loaded = load_model(args.model, device)
    dataset = load_dataset(args.prepared)
    if loaded.vocab != dataset.vocab:
        raise UserError(
            f"{args.model} was trained on another vocabulary ({len(loaded.vocab)} tokens) than "
            f"{args.prepared} holds ({len(dataset.vocab)}): its figures would be meaningless; "
            "run `dvc repro train` to train on the prepared data"
        )
    # float32 whatever the training dtype: the headline figures must not depend on the hardware
    results = evaluate_splits(
        loaded.model, dataset.splits, params.evaluate.seq_len, params.evaluate.batch_size
    )
    for name, split_metrics in results.items():  # bits per character compare runs across levels
        per_token = dataset.characters_per_token(name)
        if per_token:
            for kind in ("", "stateless_"):
                bits = split_metrics[f"{kind}bits_per_token"]
                split_metrics[f"{kind}bits_per_character"] = bits / per_token
    write_json(args.out, results)
    run_id = read_json(args.train_metrics)["mlflow_run_id"]
    with store.active_run(run_id=run_id):
        mlflow.log_metrics({f"eval.{k}": v for k, v in flatten(results).items()})
    for name, m in results.items():
        print(
            f"evaluate: {name}: loss {m['loss']:.4f} nats/token, perplexity {m['perplexity']:.2f}, "
            f"{m['bits_per_token']:.3f} bits/token ({m.get('bits_per_character', float('nan')):.3f} per "
            f"character), accuracy {m['accuracy']:.3f} "
            f"(stateless windows of {params.evaluate.seq_len}: loss {m['stateless_loss']:.4f})"
        )


if __name__ == "__main__":
    run_main(main)
