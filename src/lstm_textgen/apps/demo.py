"""`lstm-textgen demo` (`make demo`): a web page to show a model to someone who will not use curl.

A gradio page on http://127.0.0.1:7860 with two tabs. Generate streams the text into the page as it
is drawn, with a stop button; Score shows a text's bits per character and colours each character by
the model's surprisal. A picker switches between the registered versions (the registry's champion
first) or any model given with `--model` (a checkpoint path or a model URI).

The page calls the served model's own code: `serving.request_settings` checks a request's values,
`generation.encode_prompt` the prompt (the same messages, word for word), the model's batcher
(`inference/batcher.py`: one per model, every page's stream steps in it) draws the tokens and
`scoring.score_text` scores. It works offline: gradio's fonts and scripts are served by the page
itself, analytics are off and server-side rendering (a Node process) is not used.
"""

from __future__ import annotations

import argparse
import html
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, get_args

from lstm_textgen.apps.demo_models import ModelCache, ModelEntry, describe, model_entries, registered_entries
from lstm_textgen.errors import UserError
from lstm_textgen.params import Sampling

DEFAULT_PORT = 7860
FRAME_SECONDS = 0.05  # the page is updated at most this often while text streams in
HOT_BITS = 8.0  # surprisal shown in the strongest colour (and above)


def error_html(exc: Exception) -> str:
    """The message a served model would answer with (an MlflowException's, or a UserError's), as is."""
    message = getattr(exc, "message", None) or str(exc)
    return f'<p class="error"><strong>Error:</strong> {html.escape(message)}</p>'


def stream_generation(
    loaded: Any, batcher: Any, prompt: str, settings: dict[str, Any]
) -> Iterator[tuple[str, str]]:
    """(text so far, status) as the continuation grows; a bad request yields its message once.
    `settings` are a request's optional columns (max_new_tokens, temperature, ...). The row steps in
    the model's batcher beside every other page's; Stop (gradio closes this generator) or a closed
    page frees it at the next step."""
    from mlflow.exceptions import MlflowException

    from lstm_textgen.inference.generation import encode_prompt, stream_row
    from lstm_textgen.inference.rows import Row
    from lstm_textgen.serving.model import request_settings

    sample = loaded.params.sample
    try:
        prompt, length, sampling = request_settings({"prompt": prompt, **settings}, {}, sample)
        ids = encode_prompt(prompt, loaded.vocab, sample.unknown, sample.replacement)
        row = Row(ids, length, sampling, stream=True)
        batcher.submit([row])
    except (UserError, MlflowException) as exc:
        yield prompt, error_html(exc)
        return
    text, shown, start = prompt, float("-inf"), time.monotonic()  # the first piece shows at once
    try:
        for piece in stream_row(loaded.vocab, ids, row.stream()):
            text += piece
            if time.monotonic() - shown >= FRAME_SECONDS:
                shown = time.monotonic()
                yield text, "generating…"
    finally:
        row.cancel()
    yield text, f"{length:,} tokens in {time.monotonic() - start:.2f} s"


def surprisal_colour(bits: float | None) -> str:
    """Transparent for no prediction; from pale to strong red as the bits grow to HOT_BITS."""
    if bits is None:
        return "transparent"
    return f"rgba(220, 38, 38, {min(bits / HOT_BITS, 1.0):.3f})"


def coloured_html(pieces: list[tuple[str, float | None]]) -> str:
    """Each piece in a span coloured by its bits per character, the figure in its tooltip."""
    spans = []
    for piece, bits in pieces:
        title = "no prediction (first token)" if bits is None else f"{bits:.2f} bits per character"
        spans.append(
            f'<span class="surprisal" data-bits="{"" if bits is None else f"{bits:.3f}"}" '
            f'title="{title}" style="background:{surprisal_colour(bits)}">{html.escape(piece)}</span>'
        )
    legend = (
        '<div class="surprisal-legend">surprisal: '
        f'<span style="background:{surprisal_colour(0.5)}">&nbsp;low&nbsp;</span> '
        f'<span style="background:{surprisal_colour(HOT_BITS / 2)}">&nbsp;{HOT_BITS / 2:g} bits&nbsp;</span> '
        f'<span style="background:{surprisal_colour(HOT_BITS)}">&nbsp;{HOT_BITS:g}+ bits&nbsp;</span></div>'
    )
    body = "".join(spans)
    return f'{legend}<div id="surprisal-text" style="white-space:pre-wrap;line-height:1.6">{body}</div>'


def score_page(loaded: Any, text: str) -> tuple[str, str]:
    """(figures, coloured text), both HTML, for the Score tab."""
    from mlflow.exceptions import MlflowException

    from lstm_textgen.inference.scoring import character_surprisal, score_loaded
    from lstm_textgen.serving.model import checked_prompt

    try:
        score = score_loaded(loaded, checked_prompt({"prompt": text}), per_token=True)
    except (UserError, MlflowException) as exc:
        return error_html(exc), ""
    figures = (
        f'<h2 id="bits-per-character">{score.bits_per_character:.3f} bits per character</h2><p>'
        f"{score.bits_per_token:.3f} bits per token · perplexity {score.perplexity:.2f} · "
        f"{score.predicted:,} of {score.tokens:,} tokens predicted ({score.characters:,} characters)"
        + (f" · {score.unknown:,} outside the vocabulary" if score.unknown else "")
        + "</p>"
    )
    return figures, coloured_html(character_surprisal(loaded.vocab, score))


def sampling_defaults(loaded: Any) -> dict[str, Any]:
    """The controls' starting values: the model's own request defaults."""
    from lstm_textgen.serving.model import request_defaults

    return request_defaults(loaded.params.sample)


def sampling_controls(gr: Any, start: dict[str, Any]) -> dict[str, Any]:
    """One control per sampling setting (`Sampling` in params.py), in its order, each starting at the
    model's request defaults (where "off" is 0 for top-k, 1 for top-p, -1 for the seed)."""
    strategies = list(get_args(Sampling.model_fields["strategy"].annotation))
    builders = {
        "strategy": lambda: gr.Radio(
            strategies, value=start["strategy"], label="Strategy", elem_id="strategy"
        ),
        "temperature": lambda: gr.Slider(
            0.05, 2.0, value=start["temperature"], step=0.05, label="Temperature"
        ),
        "top_k": lambda: gr.Number(start["top_k"], precision=0, minimum=0, label="Top-k (0 = off)"),
        "top_p": lambda: gr.Slider(0.01, 1.0, value=start["top_p"], step=0.01, label="Top-p (1 = off)"),
        "draws": lambda: gr.Number(start["draws"], precision=0, minimum=1, label="Draws (mode strategy)"),
        "seed": lambda: gr.Number(
            start["seed"], precision=0, label="Seed (-1 = a different text each time)", elem_id="seed"
        ),
    }
    missing = [name for name in Sampling.model_fields if name not in builders]
    if missing:
        raise TypeError(f"the demo has no control for the sampling setting(s) {', '.join(missing)}")
    return {name: builders[name]() for name in Sampling.model_fields}


def build_page(entries: list[ModelEntry], models: ModelCache) -> Any:
    """The gradio Blocks: picker, Generate tab, Score tab, wired to the functions above."""
    import gradio as gr

    from lstm_textgen.serving.limits import MAX_NEW_TOKENS

    first = models.get(entries[0].source)
    start = sampling_defaults(first)
    with gr.Blocks(title="lstm-textgen", analytics_enabled=False) as page:
        gr.Markdown("# lstm-textgen\nA recurrent language model, generating and scoring text.")
        picker = gr.Dropdown(
            [(e.label, e.source) for e in entries], value=entries[0].source, label="Model", elem_id="picker"
        )
        about = gr.Markdown(describe(first), elem_id="about")
        with gr.Tab("Generate", elem_id="generate-tab"):
            prompt = gr.Textbox(first.params.sample.prompts[0], label="Prompt", lines=3, elem_id="prompt")
            with gr.Row():
                length = gr.Slider(
                    1,
                    MAX_NEW_TOKENS,
                    value=start["max_new_tokens"],
                    step=1,
                    label="Length (tokens)",
                    elem_id="length",
                )
            with gr.Row():
                controls = sampling_controls(gr, start)
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                stop = gr.Button("Stop", variant="stop", elem_id="stop")
            output = gr.Textbox(label="Text", lines=14, interactive=False, elem_id="output")
            status = gr.HTML(elem_id="generate-status")
        with gr.Tab("Score", elem_id="score-tab"):
            text = gr.Textbox(label="Text to score", lines=6, elem_id="score-text")
            score = gr.Button("Score", variant="primary", elem_id="score")
            figures = gr.HTML(elem_id="score-figures")
            coloured = gr.HTML(elem_id="score-coloured")

        def on_generate(source, prompt_text, *values):
            names = ("max_new_tokens", *controls)
            yield from stream_generation(
                models.get(source), models.batcher(source), prompt_text, dict(zip(names, values, strict=True))
            )

        reset = [name for name in controls if name != "seed"]  # a chosen seed outlives a switch

        def on_pick(source):
            loaded = models.get(source)
            chosen = sampling_defaults(loaded)
            return describe(loaded), *(chosen[name] for name in reset)

        running = generate.click(
            on_generate, [picker, prompt, length, *controls.values()], [output, status], concurrency_limit=4
        )
        # after the cancel has landed: gradio puts a cancelled event's outputs back as it ends
        stop.click(None, cancels=[running]).then(lambda: "stopped", None, [status])
        picker.change(on_pick, [picker], [about, *(controls[name] for name in reset)])
        score.click(lambda source, t: score_page(models.get(source), t), [picker, text], [figures, coloured])
    return page


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lstm-textgen demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="a checkpoint path or model URI, shown first (default: the champion)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported
    from lstm_textgen.devices import resolve_device
    from lstm_textgen.serving.drain import drain_on_sigterm, drain_seconds

    entries = model_entries(args.model, registered_entries())
    models = ModelCache(str(resolve_device(args.device)))
    page = build_page(entries, models)
    closed = threading.Event()

    def close() -> None:
        closed.set()
        page.close()

    # SIGTERM: the pages' texts finish (new ones are refused), then the server closes and exit 0
    drain_on_sigterm(lambda: list(models.batchers.values()), drain_seconds(), close, "demo")
    print(f"demo: {len(entries)} model(s); the first is {entries[0].label}", flush=True)
    where = {"server_name": args.host, "server_port": args.port}
    try:
        page.queue(default_concurrency_limit=4).launch(
            **where, ssr_mode=False, pwa=False, mcp_server=False, quiet=False, prevent_thread_lock=True
        )
    except Exception:
        if not closed.is_set():
            raise  # else the drain closed the server while gradio still checked its own page
    if closed.is_set():
        page.close()  # the drain may have closed it before gradio's server was up
    page.block_thread()
