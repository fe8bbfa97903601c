"""The web demo and the offline plots page: their parts that need no browser (surprisal per character,
the coloured text, the picker's entries, the plots template), then the pages themselves driven in
Chromium with the network cut, on the pipeline's registered model."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    CHROMIUM,
    build_vocabulary,
    free_port,
    offline,
    require_browser,
    run,
    tool_env,
    wait_for_page,
)

from lstm_textgen.apps.demo import coloured_html
from lstm_textgen.apps.demo_models import ModelEntry, model_entries, version_label
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
        Vocabulary.byte_level(lowercase=False) if level == "byte" else build_vocabulary(TEXT, level, False)
    )
    torch.manual_seed(0)
    model = RecurrentLM(len(vocab), ModelParams(layers=1, hidden=16, embedding_dim=8)).eval()
    score = score_text(model, vocab, TEXT, windows=EvaluateParams(), unknown="replace", per_token=True)
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


# --- the pages in a real browser, on the pipeline's registered model ---

MODEL_NAME = "lstm-textgen-shakespeare-char"
# Every wait below ends on what the page shows; this is only the deadline, generous because the
# suite's other workers share the two cores (Playwright's own default, 30 s, is met under that load).
PAGE_TIMEOUT_MS = 180_000


@contextlib.contextmanager
def demo_page(repo: Path, log: Path) -> Iterator[tuple[object, list[str]]]:
    """`lstm-textgen demo` on a free port in `repo`, opened in headless Chromium with the network cut:
    every request that is not to the page's own server is refused and listed."""
    require_browser()
    from playwright.sync_api import sync_playwright

    port = free_port()
    command = ["lstm-textgen", "demo", "--port", str(port)]
    output = log.open("w")
    process = subprocess.Popen(command, cwd=repo, env=tool_env(repo), stdout=output, stderr=output)
    external: list[str] = []
    try:
        url = wait_for_page(process, f"http://127.0.0.1:{port}", log)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.route("**/*", lambda route: offline(route, external))
            page.goto(url)
            page.wait_for_selector("#generate")
            yield page, external
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=20)
        output.close()


def generate_in_page(page, prompt: str, length: int, seed: int) -> tuple[str, list[int]]:
    """Type the prompt, length and seed, press Generate; the final text and the lengths it had as it grew."""
    page.fill("#prompt textarea", prompt)
    page.fill("#length input[type=number]", str(length))
    page.press("#length input[type=number]", "Enter")
    page.fill("#seed input", str(seed))
    page.press("#seed input", "Tab")
    page.evaluate(
        """() => { const box = document.querySelector('#output textarea'); window.seen = [];
        window.watch = setInterval(() => { const n = box.value.length;
          if (window.seen.at(-1) !== n) window.seen.push(n); }, 5); }"""
    )
    page.click("#generate")
    page.wait_for_function("() => /tokens in/.test(document.querySelector('#generate-status').innerText)")
    seen = page.evaluate("() => { clearInterval(window.watch); return window.seen; }")
    return page.input_value("#output textarea"), seen


def register_large_untrained_version(store: Path, tmp_path: Path, run_id: str) -> int:
    """A second registered version, 2 x 1024 and untrained: switching to it changes the page's
    description and what is generated, and it generates slowly enough to be stopped midway."""
    import torch

    from lstm_textgen.model.checkpoint import load_checkpoint, save_checkpoint
    from lstm_textgen.model.recurrent import RecurrentLM
    from lstm_textgen.params import parse_params
    from lstm_textgen.tracking.registry import register

    checkpoint = load_checkpoint(store / "data/model/model.pt")
    checkpoint["params"]["model"].update(layers=2, hidden=1024)
    torch.manual_seed(0)
    shape = parse_params(checkpoint["params"]).model
    checkpoint["model"] = RecurrentLM(len(checkpoint["vocab"]["tokens"]), shape).state_dict()
    save_checkpoint(tmp_path / "large.pt", checkpoint)
    tags = {"corpus": "shakespeare", "level": "char", "lowercase": "false", "val_bits_per_character": "6.25"}
    return register(
        tmp_path / "large.pt", run_id, MODEL_NAME, example_prompt="ROMEO:", val_loss=99.0, version_tags=tags
    ).version


def pick_version(page, version: int) -> None:
    page.click("#picker input")
    page.get_by_role("option").filter(has_text=f"{MODEL_NAME} v{version} ").click()
    page.wait_for_function(f"() => document.querySelector('#picker input').value.includes(' v{version} ')")


def stop_midway(page, prompt: str) -> str:
    """Generate 2000 tokens, press Stop once the text has started: the text stops where it was."""
    page.fill("#prompt textarea", prompt)
    page.fill("#length input[type=number]", "2000")
    page.press("#length input[type=number]", "Enter")
    page.fill("#seed input", "-1")
    page.click("#generate")
    page.wait_for_function(
        "p => { const v = document.querySelector('#output textarea').value; "
        "return v.startsWith(p) && v.length > p.length; }",
        arg=prompt,
    )
    page.click("#stop")
    page.wait_for_function("() => document.querySelector('#generate-status').innerText === 'stopped'")
    stopped = settled_text(page)
    assert page.inner_text("#generate-status") == "stopped"  # not "2,000 tokens in ...": it never finished
    return stopped


def settled_text(page, quiet_ms: int = 1500) -> str:
    """The output once it has not changed for `quiet_ms` (what was already on its way has arrived);
    fails at the page's deadline if it never stops growing."""
    page.wait_for_function(
        """quiet => { const v = document.querySelector('#output textarea').value, now = Date.now();
        if (window.lastText !== v) { window.lastText = v; window.lastChange = now; }
        return now - window.lastChange >= quiet; }""",
        arg=quiet_ms,
        polling=100,
    )
    return page.input_value("#output textarea")


def generate_in_two_pages(page, external: list[str], requests: list[tuple[str, int]]) -> list[str]:
    """A second page beside `page`; both press Generate at once (prompt, seed each, 2000 tokens);
    their final texts."""
    second = page.context.browser.new_page(viewport={"width": 1200, "height": 1000})
    second.set_default_timeout(PAGE_TIMEOUT_MS)
    second.route("**/*", lambda route: offline(route, external))
    second.goto(page.url)
    second.wait_for_selector("#generate")
    pages = [page, second]
    for each, (prompt, seed) in zip(pages, requests, strict=True):
        each.fill("#prompt textarea", prompt)
        each.fill("#length input[type=number]", "2000")
        each.press("#length input[type=number]", "Enter")
        each.fill("#seed input", str(seed))
        each.press("#seed input", "Tab")
    for each in pages:
        each.click("#generate")
    for each in pages:
        each.wait_for_function("() => /tokens in/.test(document.querySelector('#generate-status').innerText)")
    texts = [each.input_value("#output textarea") for each in pages]
    second.close()
    return texts


@pytest.mark.slow
def test_demo_page_streams_scores_and_switches_models_offline(
    store: Path, tmp_path: Path, scratch_run: str
) -> None:
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    large = register_large_untrained_version(store, tmp_path, scratch_run)
    champion = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    with demo_page(store, tmp_path / "demo.log") as (page, refused):
        assert "(champion)" in page.input_value("#picker input")  # the champion is shown first
        text, _ = generate_in_page(page, "ROMEO:", 2000, seed=7)
        served = champion.predict(pd.DataFrame({"prompt": ["ROMEO:"], "max_new_tokens": [2000], "seed": [7]}))
        assert text == "ROMEO:" + served["text"][0]  # the served model's generation code, streamed
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)

        # two pages at once: both stream through the model's one batcher, each as if alone
        requests = [("JULIET:", 11), ("KING HENRY:", 12)]
        both = generate_in_two_pages(page, refused, requests)
        for (prompt, seed), shown in zip(requests, both, strict=True):
            alone = champion.predict(
                pd.DataFrame({"prompt": [prompt], "max_new_tokens": [2000], "seed": [seed]})
            )
            assert shown == prompt + alone["text"][0]

        page.fill("#prompt textarea", "ROMEO: \u2603")
        page.click("#generate")
        page.wait_for_selector("#generate-status .error")
        with pytest.raises(MlflowException) as refused_by_the_model:
            champion.predict(pd.DataFrame({"prompt": ["ROMEO: \u2603"]}))
        shown = page.inner_text("#generate-status")
        assert shown.startswith("Error: prompt has 1 token(s) not in the vocabulary: '\u2603'")
        assert shown.removeprefix("Error: ") in str(refused_by_the_model.value)

        page.get_by_role("tab", name="Score").click()
        excerpt = "ROMEO:\nBut soft, what light through yonder window breaks?"
        page.fill("#score-text textarea", excerpt)
        page.click("#score")
        page.wait_for_selector("#surprisal-text span")
        scored = champion.predict(pd.DataFrame({"prompt": [excerpt]}), params={"task": "score"})
        shown = page.inner_text("#bits-per-character")
        assert shown == f"{scored['bits_per_character'][0]:.3f} bits per character"
        spans = page.eval_on_selector_all(
            "#surprisal-text span", "s => s.map(e => [e.textContent, e.dataset.bits])"
        )
        assert "".join(piece for piece, _ in spans) == excerpt  # every character, each coloured
        assert spans[0][1] == "" and len({bits for _, bits in spans[1:]}) > 10
        page.screenshot(path=str(tmp_path / "score.png"), full_page=True)

        page.get_by_role("tab", name="Generate").click()
        pick_version(page, large)
        page.wait_for_function("() => document.querySelector('#about').innerText.includes('LSTM 2×1024')")
        # the large model draws a token in milliseconds, not microseconds: the text is seen growing
        switched, seen = generate_in_page(page, "ROMEO:", 400, seed=7)
        assert switched.startswith("ROMEO:") and switched != text[: len(switched)]
        growing = [n for n in seen[1:] if len("ROMEO:") < n < len(switched)]  # [0]: before the click
        assert len(growing) >= 3 and growing == sorted(growing), seen  # it grew in the page, in steps
        assert len(stop_midway(page, "JULIET:")) < len("JULIET:") + 2000
        assert refused == []  # nothing but the page's own server was asked for anything
    keep_screenshots(tmp_path / "demo.png", tmp_path / "score.png")


def keep_screenshots(*shots: Path) -> None:
    """`make screenshots` sets LSTM_TEXTGEN_SCREENSHOTS: the README's pictures come from this test."""
    folder = os.environ.get("LSTM_TEXTGEN_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy(shot, Path(folder) / shot.name)


@pytest.mark.slow
def test_plots_page_draws_its_charts_offline(store: Path) -> None:
    run(["lstm-textgen", "plots"], cwd=store)
    index = store / "dvc_plots/index.html"
    assert "cdn.jsdelivr" not in index.read_text()
    require_browser()
    from playwright.sync_api import sync_playwright

    refused: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page()
        page.route("**/*", lambda route: offline(route, refused))
        page.goto(index.as_uri())
        page.wait_for_selector("svg.marks")
        lines = page.eval_on_selector_all("svg.marks path", "paths => paths.length")
        titles = page.eval_on_selector_all("svg.marks text", "texts => texts.map(t => t.textContent)")
        charts = page.eval_on_selector_all("svg.marks", "charts => charts.length")
        browser.close()
    assert lines > 10 and "val_loss" in titles
    # the two declared charts only: no default chart of the history's last column against its first
    assert charts == 2 and {"Loss per step", "Loss against training time"} <= set(titles), titles
    assert refused == []
