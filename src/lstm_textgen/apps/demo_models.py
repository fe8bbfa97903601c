"""The models the demo page offers and keeps loaded: the picker's choices (a `--model` first, then
every registered version, each model's champion first) and a cache that loads each once, with the
batcher its streams step in."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from lstm_textgen.errors import UserError


@dataclass(frozen=True)
class ModelEntry:
    """One choice in the picker: what to load and how to name it."""

    source: str  # a model URI or a checkpoint path
    label: str


def version_label(name: str, version: Any, champion: bool) -> str:
    """`NAME v3 (champion) · corpus · level · 2.08 bits/char · 2026-12-01 10:00` from the version's tags."""
    tags = version.tags or {}
    bpc = tags.get("val_bits_per_character")
    created = datetime.fromtimestamp(version.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M")
    parts = [
        f"{name} v{version.version}" + (" (champion)" if champion else ""),
        tags.get("corpus", "?"),
        tags.get("level", "?"),
        f"val {float(bpc):.3f} bits/char" if bpc else "val bits/char not recorded",
        created,
    ]
    return " · ".join(parts)


def registered_entries() -> list[ModelEntry]:
    """Every registered version in the repository's store: each model's champion first, then the
    newest versions; models with the most recent version first."""
    from mlflow.tracking import MlflowClient

    from lstm_textgen.tracking import store
    from lstm_textgen.tracking.registry import CHAMPION

    client = MlflowClient(tracking_uri=store.tracking_uri())
    groups = []
    for model in client.search_registered_models():
        champion = model.aliases.get(CHAMPION) if model.aliases else None
        versions = client.search_model_versions(f"name='{model.name}'")
        versions.sort(key=lambda v: (str(v.version) != str(champion), -int(v.version)))
        entries = [
            ModelEntry(
                f"models:/{model.name}/{v.version}",
                version_label(model.name, v, str(v.version) == str(champion)),
            )
            for v in versions
        ]
        newest = max((v.creation_timestamp for v in versions), default=0)
        groups.append((newest, entries))
    groups.sort(key=lambda group: -group[0])
    return [entry for _, entries in groups for entry in entries]


def model_entries(extra: str | None, registered: list[ModelEntry]) -> list[ModelEntry]:
    """The picker's choices: `--model` first when given, then the registry's versions."""
    entries = list(registered)
    if extra is not None and all(e.source != extra for e in entries):
        entries.insert(0, ModelEntry(extra, extra))
    if not entries:
        raise UserError(
            "no model to show: the registry holds none (run `make repro`), and --model was not given "
            "(a checkpoint path such as data/model/model.pt, or a model URI)"
        )
    return entries


class ModelCache:
    """Models loaded once each, on first use, each with its running batcher (every page's stream
    steps in one batch per model); safe to call from gradio's worker threads."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.loaded: dict[str, Any] = {}
        self.batchers: dict[str, Any] = {}
        self.lock = threading.Lock()

    @classmethod
    def holding(cls, source: str, loaded: Any, batcher: Any) -> ModelCache:
        """A cache of one model already loaded, stepping in a batcher another server runs: the page
        that `lstm-textgen serve --demo` mounts shares the API's batch."""
        cache = cls(str(next(loaded.model.parameters()).device))
        cache.loaded[source], cache.batchers[source] = loaded, batcher
        return cache

    def get(self, source: str) -> Any:
        from lstm_textgen.tracking.registry import load_source

        with self.lock:
            if source not in self.loaded:
                self.loaded[source] = load_source(source, self.device)
            return self.loaded[source]

    def batcher(self, source: str) -> Any:
        from lstm_textgen.inference.batcher import RowBatcher

        loaded = self.get(source)
        with self.lock:
            if source not in self.batchers:
                self.batchers[source] = RowBatcher(loaded.model).start()
            return self.batchers[source]


def describe(loaded: Any) -> str:
    """A line about the model shown under the picker."""
    params, vocab = loaded.params, loaded.vocab
    model = params.model
    size = sum(p.numel() for p in loaded.model.parameters())
    return (
        f"**{params.data.corpus}** · {vocab.level} level, {len(vocab):,} tokens · "
        f"{model.cell.upper()} {model.layers}×{model.hidden} · {size / 1e6:.2f} M parameters"
    )
