"""The web demo's parts that need no browser: surprisal per character, the coloured text, the
picker's entries, the offline plots template. The page itself is driven in Chromium in
test_serving.py (it needs the pipeline's registered model)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lstm_textgen.apps.demo import ModelEntry, coloured_html, model_entries, version_label
from lstm_textgen.apps.plots import dvc_plots_command, offline_template
from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.errors import UserError
from lstm_textgen.inference.scoring import character_surprisal, score_text
from lstm_textgen.model.recurrent import RecurrentLM
from lstm_textgen.params import EvaluateParams, ModelParams

TEXT = "Tomorrow, and tomorrow, and tomorrow — naïve café.\n"


@pytest.mark.parametrize("level", ["char", "byte", "word"])
def test_surprisal_pieces_rebuild_the_text_and_carry_every_bit(level: str) -> None:
    vocab = (
        Vocabulary.byte_level(lowercase=False) if level == "byte" else Vocabulary.build(TEXT, level, False)
    )
    torch.manual_seed(0)
    model = RecurrentLM(len(vocab), ModelParams(layers=1, hidden=16, embedding_dim=8)).eval()
    score = score_text(model, vocab, TEXT, EvaluateParams(), unknown="replace", per_token=True)
    pieces = character_surprisal(vocab, score)
    rebuilt = "".join(piece for piece, _ in pieces)
    assert rebuilt == vocab.decode(score.token_ids)
    if level != "word":
        assert rebuilt == TEXT  # every character is shown, whole (é and — take two or three bytes)
    assert pieces[0][1] is None  # the first token is not predicted
    total_bits = sum(len(piece) * bits for piece, bits in pieces if bits is not None)
    assert total_bits == pytest.approx(score.nats / math.log(2), rel=1e-4)


def test_coloured_text_escapes_html_and_scales_the_colour() -> None:
    page = coloured_html([("<b>", None), ("&", 0.0), ("x", 4.0), ("y", 100.0)])
    assert "&lt;b&gt;" in page and "&amp;" in page and "<b>" not in page
    assert "rgba(220, 38, 38, 0.500)" in page and "rgba(220, 38, 38, 1.000)" in page
    assert 'data-bits=""' in page and 'data-bits="4.000"' in page


def test_picker_lists_the_given_model_first_and_needs_one() -> None:
    registered = [ModelEntry("models:/m/1", "m v1 (champion)"), ModelEntry("models:/m/2", "m v2")]
    assert [e.source for e in model_entries("data/model/model.pt", registered)] == [
        "data/model/model.pt",
        "models:/m/1",
        "models:/m/2",
    ]
    assert model_entries("models:/m/2", registered) == registered  # already listed: not twice
    with pytest.raises(UserError, match="make repro"):
        model_entries(None, [])


def test_a_missing_checkpoint_is_named(tmp_path: Path) -> None:
    from lstm_textgen.tracking.registry import load_source

    with pytest.raises(UserError, match=r"nope\.pt: no such checkpoint; give a \.pt path or a model URI"):
        load_source(str(tmp_path / "nope.pt"))


def test_version_label_names_corpus_level_bits_and_date() -> None:
    version = SimpleNamespace(
        version="3",
        creation_timestamp=1_764_547_200_000,  # 2025-12-01 00:00 UTC
        tags={"corpus": "shakespeare", "level": "bpe", "val_bits_per_character": "2.036"},
    )
    label = version_label("lstm-textgen-shakespeare-bpe", version, champion=True)
    assert label == (
        "lstm-textgen-shakespeare-bpe v3 (champion) · shakespeare · bpe · val 2.036 bits/char · "
        "2025-12-01 00:00"
    )


def test_offline_plots_template_inlines_the_scripts() -> None:
    template = offline_template("window.vegaEmbed = function () {};")
    assert "{plot_divs}" in template and "window.vegaEmbed" in template
    assert "http" not in template  # nothing fetched
    with pytest.raises(ValueError, match="</script"):
        offline_template("x = '</script>'")
    assert dvc_plots_command([], Path("t.html"))[-4:] == ["plots", "show", "--html-template", "t.html"]
    assert dvc_plots_command(["diff", "main"], Path("t.html"))[-5:-2] == ["plots", "diff", "main"]
    with pytest.raises(UserError, match="`show` or `diff`"):
        dvc_plots_command(["modify"], Path("t.html"))
