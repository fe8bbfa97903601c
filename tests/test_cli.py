"""The one `lstm-textgen` command: every verb answers --help, an unknown verb is named, and
docs/params.md is the current output of `lstm-textgen params`."""

from __future__ import annotations

from pathlib import Path

import pytest

from lstm_textgen.apps.cli import VERBS, main
from lstm_textgen.apps.params_table import render
from lstm_textgen.params import Params, flatten

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {verb} " in out for verb in VERBS)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_each_verb_has_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    assert f"lstm-textgen {verb}" in capsys.readouterr().out


def test_an_unknown_verb_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["smaple"])
    assert exit_.value.code == 2
    assert "unknown verb 'smaple'" in capsys.readouterr().err


def test_the_params_page_is_current_and_covers_every_key() -> None:
    page = render()
    assert (REPO / "docs/params.md").read_text() == page, "stale: run `make params`"
    keys = [k for k in flatten(Params().model_dump(by_alias=True)) if not k.startswith("corpora.")]
    # the entries of the two tables (a corpus, a searched key) by their keys' names
    named = [f"tune.space.KEY.{k.rsplit('.', 1)[1]}" if k.startswith("tune.space.") else k for k in keys]
    missing = [key for key in named if f"| `{key}` |" not in page]
    assert not missing
    undescribed = [line for line in page.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert not undescribed, "every field of params.py carries a description"
