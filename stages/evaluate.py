"""DVC stage `evaluate`: best checkpoint + val/test splits -> metrics/evaluate.json, logged to the
training run in MLflow (loss, perplexity, bits per token and per character, accuracy; stateful and
stateless). Bits per character use the characters each split's tokens stand for (splits.json)."""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow

from lstm_textgen.data.dataset import load_dataset
from lstm_textgen.devices import resolve_device
from lstm_textgen.errors import run_main
from lstm_textgen.files import read_json, write_json
from lstm_textgen.inference.evaluation import check_same_vocabulary, evaluate_dataset
from lstm_textgen.model.checkpoint import load_model
from lstm_textgen.params import flatten, load_params
from lstm_textgen.tracking import liveness
from lstm_textgen.tracking.datasets import log_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", type=Path, default=Path("data/model/model.pt"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--corpus-info", type=Path, default=Path("data/raw/corpus.json"))
    parser.add_argument("--train-metrics", type=Path, default=Path("metrics/train.json"))
    parser.add_argument("--out", type=Path, default=Path("metrics/evaluate.json"))
    args = parser.parse_args()

    params = load_params(args.params)
    loaded = load_model(args.model, resolve_device(params.train.device))
    dataset = load_dataset(args.prepared)
    check_same_vocabulary(loaded.vocab, dataset, args.model, args.prepared)
    # float32 whatever the training dtype: the headline figures must not depend on the hardware
    results = evaluate_dataset(loaded.model, dataset, params.evaluate.seq_len, params.evaluate.batch_size)
    write_json(args.out, results)
    with liveness.active_run(run_id=read_json(args.train_metrics)["mlflow_run_id"]) as run:
        mlflow.log_metrics({f"eval.{k}": v for k, v in flatten(results).items()})
        corpus = read_json(args.corpus_info)
        log_corpus(mlflow.MlflowClient(), run.info.run_id, corpus, dataset, context="evaluation")
    for name, m in results.items():
        print(
            f"evaluate: {name}: loss {m['loss']:.4f} nats/token, perplexity {m['perplexity']:.2f}, "
            f"{m['bits_per_token']:.3f} bits/token ({m.get('bits_per_character', float('nan')):.3f} per "
            f"character), accuracy {m['accuracy']:.3f} "
            f"(stateless windows of {params.evaluate.seq_len}: loss {m['stateless_loss']:.4f})"
        )


if __name__ == "__main__":
    run_main(main)
