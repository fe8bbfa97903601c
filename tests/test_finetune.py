"""Fine-tuning as a user runs it: pretrain on one corpus, `dvc exp run -S train.init_from=...` on
another; the vocabulary grows by exactly the new characters, training starts far below a run from
scratch, the lineage is in MLflow, and the result samples and is registered and servable."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import edit_params, run, runs_by_name, store_client, tiny_repo, tool_env, tracking_store

from lstm_textgen.data.corpora import to_text
from lstm_textgen.params import CorpusSpec

pytestmark = pytest.mark.slow
SOURCE_MODEL = "lstm-textgen-tinyshakespeare-char"
TRAINING = {"max_steps": 200, "eval_every": 20, "eval_batches": 4, "warmup_steps": 10, "lr": 0.01}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, corpora_dir: Path) -> Path:
    repo = tiny_repo(tmp_path_factory.mktemp("finetune") / "repo")
    local = {name: {"source": str(corpora_dir / f"{name}.txt")} for name in ("tinyshakespeare", "wonderland")}
    edit_params(repo / "params.yaml", data={"corpus": "tinyshakespeare"}, corpora=local, train=TRAINING)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "pretraining"], cwd=repo)
    run(["dvc", "repro"], cwd=repo, env=tool_env(repo))
    # the pretrained model, kept apart: a failing `dvc exp run` below removes the workspace's outputs
    shutil.copy(repo / "data/model/model.pt", repo.parent / "pretrained.pt")
    return repo


def first_val_loss(repo: Path) -> float:
    with (repo / "metrics/train_history.csv").open() as file:
        return float(next(csv.DictReader(file))["val_loss"])


def from_scratch_first_val_loss(repo: Path, tmp_path: Path) -> float:
    """The same training on the same prepared data from random weights: the baseline the fine-tune
    must beat (the library's `train`, as the stage calls it, without a second pipeline run)."""
    from lstm_textgen.data.dataset import load_dataset
    from lstm_textgen.params import load_params, with_settings
    from lstm_textgen.train.loop import train

    params = with_settings(load_params(repo / "params.yaml"), {"train.init_from": None})
    dataset = load_dataset(repo / "data/prepared")
    result = train(dataset.splits, dataset.vocab, params, tmp_path / "best.pt", tmp_path / "last.pt")
    return float(result.history[0]["val_loss"])


def test_fine_tuning_grows_the_vocabulary_and_starts_from_the_source(
    repo: Path, corpora_dir: Path, tmp_path: Path
) -> None:
    env = tool_env(repo)
    source_tokens = json.loads((repo / "data/prepared/vocab.json").read_text())["tokens"]
    onto_alice = ["-S", "data.corpus=wonderland", "-S", "train.max_steps=20"]

    # the fine-tuning preset, its source being this repo's champion (later -S values win)
    preset = ["lstm-textgen", "presets", "run", "shakespeare-to-alice", *onto_alice]
    tuned = run([*preset, "-S", f"train.init_from=models:/{SOURCE_MODEL}@champion"], cwd=repo, env=env)
    assert "Running stage 'init'" in tuned.stdout
    run(["dvc", "exp", "apply", "shakespeare-to-alice"], cwd=repo, env=env)  # presets run with --temp
    assert first_val_loss(repo) < from_scratch_first_val_loss(repo, tmp_path) - 0.5  # nats/char, 20 steps

    alice = to_text((corpora_dir / "wonderland.txt").read_bytes(), CorpusSpec(source="x"), "alice")
    new_characters = sorted(set(alice) - set(source_tokens))
    vocab = json.loads((repo / "data/prepared/vocab.json").read_text())["tokens"]
    assert (
        vocab[: len(source_tokens)] == source_tokens and sorted(vocab[len(source_tokens) :]) == new_characters
    )
    assert json.loads((repo / "metrics/prepare.json").read_text())["added_tokens"] == len(new_characters) > 0

    runs = runs_by_name(repo)
    tuned_run = next(r for r in runs.values() if r.data.tags.get("init_from_model") == SOURCE_MODEL)
    assert tuned_run.data.tags["init_from_version"] == "1"
    assert tuned_run.data.tags["init_added_tokens"] == str(len(new_characters))
    assert f"#/models/{SOURCE_MODEL}/versions/1" in tuned_run.data.tags["mlflow.note.content"]

    registered = json.loads((repo / "metrics/register.json").read_text())
    assert registered["model_name"] == "lstm-textgen-wonderland-char"
    checkpoint = torch.load(repo / "data/model/model.pt", weights_only=True)
    assert checkpoint["model"]["embedding.weight"].shape[0] == len(vocab)
    samples = json.loads((repo / "data/samples/samples.json").read_text())
    assert all(s["text"] for s in samples)

    import mlflow.pyfunc
    import pandas as pd

    with tracking_store(repo):
        served = mlflow.pyfunc.load_model(f"models:/{registered['model_name']}/{registered['version']}")
    prompt = "Alice was beginning to get very tired" + new_characters[0]  # a character only Alice has
    assert len(served.predict(pd.DataFrame({"prompt": [prompt], "max_new_tokens": [20]}))["text"][0]) == 20
    assert store_client(repo).get_run(tuned_run.info.run_id).info.status == "FINISHED"


def test_a_model_setting_that_differs_from_the_source_is_refused(repo: Path) -> None:
    result = run(
        [
            "dvc",
            "exp",
            "run",
            "-S",
            "data.corpus=wonderland",
            "-S",
            "model.hidden=48",
            "-S",
            f"train.init_from={repo / 'data/model/model.pt'}",  # the checkpoint-path form
        ],
        cwd=repo,
        env=tool_env(repo),
        check=False,
    )
    assert result.returncode != 0
    assert "model.hidden: 32 in the source, 48 in params.yaml" in result.stdout + result.stderr


def test_a_tuning_trial_starts_from_the_fine_tuning_source(repo: Path, tmp_path: Path) -> None:
    """A study with `train.init_from` set: each trial is the fine-tune the experiment would be (the
    same training entry), tagged with the source and starting far below a start from scratch."""
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    run(["git", "checkout", "--", "params.yaml"], cwd=copy)  # as pretrained: the tests above ran experiments
    source = repo.parent / "pretrained.pt"
    tune = {"study": "tuned", "trials": 1, "experiment": False, "trial_minutes": None, "trial_steps": 20}
    edit_params(copy / "params.yaml", train={"init_from": str(source)}, tune=tune)
    refused = run(["lstm-textgen", "tune"], cwd=copy, env=tool_env(copy), check=False)
    assert refused.returncode == 2 and "model.hidden, model.layers" in refused.stderr  # the source's shape
    raw = yaml.safe_load((copy / "params.yaml").read_text())
    raw["tune"]["space"] = {"train.lr": {"low": 0.005, "high": 0.02, "log": True}}
    (copy / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["dvc", "repro", "prepare"], cwd=copy, env=tool_env(copy))
    from_scratch = from_scratch_first_val_loss(copy, tmp_path)
    run(["lstm-textgen", "tune"], cwd=copy, env=tool_env(copy))
    [trial] = [r for r in runs_by_name(copy / "mlflow.db").values() if "tune.trial" in r.data.tags]
    assert trial.data.tags["init_from"] == str(source) and trial.data.tags["tune.state"] == "COMPLETE"
    first = store_client(copy).get_metric_history(trial.info.run_id, "val_loss")
    assert min(first, key=lambda m: m.step).value < from_scratch - 0.3, (first, from_scratch)
