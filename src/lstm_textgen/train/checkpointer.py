"""The run's two checkpoints and the policy of resuming.

`best` holds the weights with the lowest periodic validation loss so far (what evaluate, sample and
register read); `last` holds everything a resumed run needs to go on exactly as if it had never stopped
(`TrainState.state_dict`, every rank's part). A resume accepts changes to where the run goes on, how
long and how it is watched (the params marked RESUMABLE in params.py); any other data, model or train
setting shaped the steps already taken and must match."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.errors import UserError
from lstm_textgen.model.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from lstm_textgen.params import RESUMABLE, Params, TrainParams, flatten, marked_keys

RESUMABLE_CHANGES = marked_keys(TrainParams, RESUMABLE, "train.")
START_OVER = "set train.resume=false to start over"


class ResumeError(UserError):
    """The last checkpoint cannot continue this run: every rank finds it so, rank 0 says it."""

    every_rank = True


def differing_settings(saved: dict[str, Any], params: Params) -> list[str]:
    """`key: saved -> now` for each data/model/train setting that differs and may not."""
    then = flatten({k: saved["params"].get(k, {}) for k in ("data", "model", "train")})
    now = flatten(params.model_dump(include={"data", "model", "train"}))
    return [
        f"{key}: {then.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(set(then) | set(now))
        if key not in RESUMABLE_CHANGES and then.get(key) != now.get(key)
    ]


@dataclass(frozen=True)
class Checkpointer:
    best_path: Path
    last_path: Path

    def save(self, state: dict[str, Any], run_info: dict[str, Any], best: bool) -> None:
        """The last checkpoint, and the best one too when this evaluation is the best so far."""
        if best:
            save_checkpoint(self.best_path, {**state, **run_info, "best_model": None})
        save_checkpoint(self.last_path, {**state, **run_info})

    def load_resumable(self, params: Params, vocab: Vocabulary) -> dict[str, Any]:
        """The last checkpoint, if it can continue a run of `params` on `vocab`; otherwise a
        ResumeError that names the file, what is wrong and the ways out."""
        path = self.last_path
        if not path.is_file():
            raise ResumeError(f"train.resume: there is no checkpoint to resume at {path}; {START_OVER}")
        try:
            saved = load_checkpoint(path)
        except CheckpointError as exc:
            raise ResumeError(
                f"train.resume: {exc}; {START_OVER}, or restore the file (`dvc checkout {path}` brings "
                "back the one of the last completed run)"
            ) from None
        if saved["format_version"] != FORMAT_VERSION:
            raise ResumeError(
                f"train.resume: {path} holds a training state of checkpoint format "
                f"{saved['format_version']}, written by an older lstm-textgen, and this one reads format "
                f"{FORMAT_VERSION}; {START_OVER}, or finish that run with the version that wrote it "
                "(its model still loads for evaluate, sample and register)"
            )
        differing = differing_settings(saved, params)
        if saved["vocab"] != vocab.to_dict():
            differing.append("the vocabulary of data/prepared (the corpus or its preparation changed)")
        if differing:
            raise ResumeError(
                f"train.resume: {path} was written by a run with other settings, so it is not loaded: "
                f"{'; '.join(differing)}. Put them back, or {START_OVER}"
            )
        return saved

    def restore_best(self, saved: dict[str, Any]) -> None:
        """DVC deletes a stage's outputs before it runs: bring back the best checkpoint of a resumed run."""
        if not self.best_path.is_file() and saved["best_model"] is not None:
            save_checkpoint(self.best_path, {**saved, "model": saved["best_model"], "best_model": None})
