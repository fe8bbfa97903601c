"""DVC stage `register`: log the best checkpoint as an MLflow pyfunc model in the training run,
register a new version, and move the `champion` alias only when validation loss improves."""

from __future__ import annotations

import argparse
from pathlib import Path

from lstm_textgen.errors import run_main
from lstm_textgen.files import read_json, write_json
from lstm_textgen.model.checkpoint import load_checkpoint
from lstm_textgen.params import load_params
from lstm_textgen.tracking.registry import default_model_name, register, registration_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", type=Path, default=Path("data/model/model.pt"))
    parser.add_argument("--train-metrics", type=Path, default=Path("metrics/train.json"))
    parser.add_argument("--eval-metrics", type=Path, default=Path("metrics/evaluate.json"))
    parser.add_argument("--out", type=Path, default=Path("metrics/register.json"))
    args = parser.parse_args()

    params = load_params(args.params)
    trained = load_checkpoint(args.model)["params"]  # what the checkpoint was trained on
    corpus, level = trained["data"]["corpus"], trained["data"]["level"]
    evaluated = read_json(args.eval_metrics)["val"]
    registration = register(
        checkpoint=args.model,
        run_id=read_json(args.train_metrics)["mlflow_run_id"],
        model_name=params.register_.model_name or default_model_name(Path(corpus).stem, level),
        example_prompt=params.sample.prompts[0],
        val_loss=evaluated["loss"],
        version_tags={
            "corpus": corpus,
            "level": level,
            "lowercase": str(trained["data"]["lowercase"]).lower(),
            "val_bits_per_token": f"{evaluated['bits_per_token']:.6f}",
            "val_bits_per_character": f"{evaluated['bits_per_character']:.6f}",
            "val_accuracy": f"{evaluated['accuracy']:.6f}",
        },
        sample=params.sample,  # the served model's defaults and unknown-token policy: today's sample.*
    )
    write_json(args.out, registration_summary(registration))
    print(f"register: {registration.model_uri}: {registration.reason}")
    print(
        f"register: serve it with: mlflow models serve -m models:/{registration.model_name}@champion "
        "-h 127.0.0.1 -p 5001 --env-manager local"
    )


if __name__ == "__main__":
    run_main(main)
