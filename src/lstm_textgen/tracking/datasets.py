"""The corpus as an MLflow dataset, so that MLflow's UI shows it where its users look: the runs
table's Dataset column and filter, and each run's inputs. Name: the corpus's; digest: the start of the
sha256 of its normalised text (MLflow's column holds 36 characters; the whole digest is in the
profile); source: where it was downloaded from; profile: characters, lines, tokens and vocabulary.
Logged by every training (trials included) as `training` and by the evaluate stage as `evaluation`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from mlflow.data.meta_dataset import MetaDataset

if TYPE_CHECKING:
    from lstm_textgen.data.dataset import Dataset

DIGEST_CHARACTERS = 32  # of the text's sha256, within MLflow's 36


def corpus_profile(corpus: dict[str, Any], dataset: Dataset) -> dict[str, Any]:
    splits = dataset.stats.get("splits", {})
    return {
        "characters": corpus.get("characters"),
        "lines": corpus.get("lines"),
        "tokens": {name: sizes.get("tokens") for name, sizes in splits.items()},
        "vocabulary": len(dataset.vocab),
        "level": dataset.vocab.level,
        "text_sha256": corpus.get("text_sha256"),
    }


class CorpusDataset(MetaDataset):
    """MLflow's metadata-only dataset, with a profile (MetaDataset has none)."""

    def __init__(self, source: Any, name: str, digest: str | None, profile: dict[str, Any]) -> None:
        self._profile = profile
        super().__init__(source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def corpus_dataset(corpus: dict[str, Any], dataset: Dataset) -> CorpusDataset:
    """The corpus as an MLflow dataset that carries only what describes it (no rows)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    source_text = str(corpus.get("source") or "")
    if source_text.startswith(("http://", "https://")):
        source: Any = HTTPDatasetSource(source_text)
    else:  # the embedded plays, or a local file
        source = CodeDatasetSource({"corpus_source": source_text})
    digest = str(corpus.get("text_sha256") or "")[:DIGEST_CHARACTERS] or None
    name = str(corpus.get("name") or "corpus")
    return CorpusDataset(source, name=name, digest=digest, profile=corpus_profile(corpus, dataset))


def log_corpus(client: Any, run_id: str, corpus: dict[str, Any], dataset: Dataset, *, context: str) -> None:
    """The corpus as the run's input, with MLflow's `mlflow.data.context` tag (`training`, `evaluation`)."""
    from mlflow.entities import DatasetInput, InputTag

    entity = corpus_dataset(corpus, dataset)._to_mlflow_entity()
    client.log_inputs(run_id, [DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])
