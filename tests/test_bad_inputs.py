"""Bad input, everywhere: each case gives a message naming the problem and the fix, a non-zero exit
where a command runs, and nothing half-written (docs/bad-inputs.md lists them with these tests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, build_vocabulary, run, split_ids, tiny_params, tool_env, write_dataset

from lstm_textgen.data.dataset import load_dataset
from lstm_textgen.data.preparation import build_dataset
from lstm_textgen.errors import UserError
from lstm_textgen.files import write_text
from lstm_textgen.params import DataParams
from lstm_textgen.train.loop import train

TEXT = "the quick brown fox jumps over the lazy dog. " * 200


def test_a_corpus_of_one_distinct_character_is_refused() -> None:
    with pytest.raises(UserError, match=r"1 distinct char token\(s\) \('a'\): there is nothing to predict"):
        build_dataset("a" * 5000, DataParams())


def test_a_tampered_vocabulary_is_refused_when_the_data_is_loaded(tmp_path: Path) -> None:
    write_dataset(build_dataset(TEXT, DataParams()), tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    vocab["tokens"] = vocab["tokens"][:5]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(
        UserError,
        match=r"train\.npy holds token id \d+, but .*vocab\.json has only 5 tokens.*dvc repro -f prepare",
    ):
        load_dataset(tmp_path)


def test_evaluate_refuses_a_checkpoint_of_another_vocabulary(tmp_path: Path) -> None:
    vocab = build_vocabulary(TEXT, "char", lowercase=False)
    params = tiny_params(train={"max_steps": 2, "eval_every": 2, "eval_batches": 1})
    train(split_ids(vocab.encode(TEXT), 0.1, 0.1), vocab, params, tmp_path / "m.pt", tmp_path / "l.pt")
    write_dataset(
        build_dataset(TEXT.upper() + "!?", DataParams(val_fraction=0.1, test_fraction=0.1)), tmp_path / "p"
    )
    command = [sys.executable, "stages/evaluate.py", "--model", str(tmp_path / "m.pt")]
    command += ["--prepared", str(tmp_path / "p"), "--train-metrics", str(tmp_path / "none.json")]
    result = run([*command, "--out", str(tmp_path / "e.json")], cwd=REPO_ROOT, env=tool_env(), check=False)
    assert result.returncode == 2
    assert "was trained on another vocabulary" in result.stderr and "dvc repro train" in result.stderr
    assert not (tmp_path / "e.json").exists()


def test_a_write_into_a_path_that_cannot_be_a_directory_says_so(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        UserError, match=r"cannot write .*file/out\.json: .*permissions \(nothing was written"
    ):
        write_text(tmp_path / "file" / "out.json", "{}")


def test_a_full_disk_stops_the_write_with_the_path_and_leaves_nothing(full_disk: Path) -> None:
    with pytest.raises(
        UserError, match=r"cannot write .*corpus\.txt: No space left on device; free some space"
    ):
        write_text(full_disk / "corpus.txt", "x" * 200_000)
    assert list(full_disk.iterdir()) == []  # no partial file, no temporary file


def test_a_params_file_that_is_not_yaml_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("data: [unclosed\n  model: 3\n")
    command = [
        sys.executable,
        str(REPO_ROOT / "stages" / "train.py"),
        "--params",
        str(tmp_path / "params.yaml"),
    ]
    result = run(command, cwd=tmp_path, env=tool_env(), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "params.yaml: not valid YAML" in result.stderr and "line 2" in result.stderr
