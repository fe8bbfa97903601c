"""One trial of a study: the trial's params trained through the one training entry (the same setup
as the train stage: fine-tuning source, checkpointer, MLflow run), its periodic validation loss
reported to the pruner, and the study's objective computed from the result."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lstm_textgen.errors import Terminated, UserError
from lstm_textgen.params import Params

if TYPE_CHECKING:
    import optuna

    from lstm_textgen.tracking.training import Trained


@dataclass(frozen=True)
class TuneFiles:
    """What the trials read (the pipeline's prepared corpus and fine-tuning source) and where they
    write."""

    root: Path

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def corpus_info(self) -> Path:
        return self.root / "data" / "raw" / "corpus.json"

    @property
    def init(self) -> Path:
        return self.root / "data" / "init"

    def study_dir(self, study: str) -> Path:
        return self.root / "data" / "tune" / study


def check_ready(params: Params, files: TuneFiles) -> None:
    """What every trial needs, checked before any worker starts: the prepared corpus, the resolved
    fine-tuning source, and a training that fits in one worker."""
    fixed = [key for key in ("train.init_from", "train.processes") if key in params.tune.space]
    if fixed:
        raise UserError(
            f"tune.space: {', '.join(fixed)} cannot be searched: the init stage resolves one fine-tuning "
            "source for every trial, and each trial trains in one process; set it in params.yaml instead"
        )
    if params.train.init_from:
        from lstm_textgen.data.source import SHAPE_KEYS

        shaped = [key for key in params.tune.space if key.removeprefix("model.") in SHAPE_KEYS]
        if shaped:
            raise UserError(
                f"tune.space: {', '.join(shaped)} cannot be searched with train.init_from set: a "
                "fine-tuned model keeps its source's shape; search the training keys only"
            )
    if params.train.processes > 1:
        raise UserError(
            f"train.processes: {params.train.processes}: a trial trains inside its worker, in one "
            "process; set train.processes=1 and run several workers (--workers) instead"
        )
    needed = [files.prepared / "vocab.json", files.corpus_info]
    if params.train.init_from:
        needed.append(files.init / "source.json")
    missing = [str(path.relative_to(files.root)) for path in needed if not path.is_file()]
    if missing:
        raise UserError(
            f"tune: no prepared corpus ({', '.join(missing)} missing): run `dvc repro prepare` first "
            "(`make tune` does)"
        )


class TrialObjective:
    """Optuna's objective: runs trials in this worker, the prepared corpus loaded once."""

    def __init__(self, params: Params, files: TuneFiles, parent_run_id: str) -> None:
        from lstm_textgen.data.dataset import load_dataset

        self.params, self.files, self.parent_run_id = params, files, parent_run_id
        self.stopped_by: BaseException | None = None  # Ctrl-C or SIGTERM, for the worker's exit code
        self.dataset = load_dataset(files.prepared)

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        from lstm_textgen.train.search import suggest, trial_params

        settings = suggest(trial, self.params.tune.space)
        try:
            params = trial_params(self.params, settings)
        except UserError as exc:  # a combination the params refuse (e.g. a float for an int key)
            raise optuna.TrialPruned(f"params refused: {exc}") from None
        started = time.monotonic()
        try:
            value, pruned_at = self.train(trial, params)
        except (KeyboardInterrupt, Terminated) as exc:
            self.stopped_by = exc
            trial.set_user_attr("stopped", f"{type(exc).__name__}: {exc}")
            raise KeyboardInterrupt from None  # Optuna marks the trial FAIL, then the worker stops
        except Exception as exc:  # Optuna marks it FAIL and goes on; the worker prints why, in one line
            said = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", said[:2000])
            raise
        trial.set_user_attr("minutes", (time.monotonic() - started) / 60)
        if pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at step {pruned_at}")
        return value

    def train(self, trial: optuna.Trial, params: Params) -> tuple[float, int | None]:
        from lstm_textgen.tracking.training import Hooks, TrainingFiles, run_training

        tune = self.params.tune
        out = self.files.study_dir(tune.study) / f"trial-{trial.number}"
        files = TrainingFiles(
            prepared=self.files.prepared,
            corpus_info=self.files.corpus_info,
            init=self.files.init,
            best=out / "model.pt",
            last=out / "last.pt",
        )
        pruned_at: int | None = None
        value = math.nan

        def report(record: dict[str, float]) -> bool:
            nonlocal pruned_at
            trial.report(record["val_loss"], int(record["step"]))
            if trial.should_prune():
                pruned_at = int(record["step"])
            return pruned_at is not None

        def finished(trained: Trained) -> None:
            nonlocal value
            run = trained.run
            run.finish(trained.result)
            assert run.outbox is not None
            if pruned_at is None:
                value = objective(params, trained, files.best)
                run.outbox.log_metrics({"tune.objective": value})
            run.outbox.set_tags({"tune.state": "PRUNED" if pruned_at is not None else "COMPLETE"})

        tags = {"mlflow.parentRunId": self.parent_run_id, "tune.study": tune.study}
        tags["tune.trial"] = str(trial.number)
        hooks = Hooks(
            name=f"{tune.study} trial {trial.number}", tags=tags, on_evaluation=report, finished=finished
        )
        run_training(params, files, hooks=hooks, dataset=self.dataset)
        return value, pruned_at


def objective(params: Params, trained: Trained, best: Path) -> float:
    """What the study minimises (`tune.objective`); evaluated in float32, as the evaluate stage."""
    if params.tune.objective == "window_val_loss":
        return float(trained.result.window_val_loss_best)
    from lstm_textgen.inference.evaluation import bits_per_character, evaluate_stateful
    from lstm_textgen.model.checkpoint import load_model

    loaded = load_model(best, trained.device)
    evaluation = params.evaluate
    figures = evaluate_stateful(
        loaded.model, trained.dataset.splits["val"], evaluation.seq_len, evaluation.batch_size
    )
    bits = bits_per_character(figures["bits_per_token"], trained.dataset.characters_per_token("val"))
    if bits is None:
        raise UserError(
            "tune.objective val_bits_per_character: data/prepared does not count the characters its "
            "tokens stand for (prepared by an older version); run `dvc repro -f prepare`, or set "
            "tune.objective=window_val_loss"
        )
    return bits
