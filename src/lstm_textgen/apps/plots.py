"""`lstm-textgen plots` (`make plots`): DVC's plots as a page that renders without a network.

`dvc plots show` writes dvc_plots/index.html, whose scripts (vega, vega-lite, vega-embed) come from
a CDN: offline, a blank page. DVC takes a page template (`--html-template`, the placeholder
`{plot_divs}`, filled by plain text replacement); ours carries the three libraries inline, from
the Vega project's own bundle in the vl-convert-python wheel, so the page is one self-contained file.
Arguments go to `dvc plots`: `show` by default, or e.g. `diff main workspace`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from lstm_textgen.errors import UserError
from lstm_textgen.files import write_text

VEGA_LITE_VERSION = "5.8"  # DVC's templates are Vega-Lite 5 specs; the oldest v5 the wheel bundles
TEMPLATE = Path(".dvc/tmp/plots-offline.html")  # DVC's own scratch folder, never committed


def offline_template(bundle: str) -> str:
    """A DVC page template with the scripts inline. `{refresh_tag}` keeps `dvc plots show --open`
    style refreshing working; DVC's `{scripts}` (the CDN tags) is left out on purpose."""
    if "</script" in bundle:
        raise ValueError("the JavaScript bundle holds '</script' and cannot be inlined")
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset='utf-8'>\n{refresh_tag}\n<title>DVC plots</title>\n"
        f"<script>\n{bundle}\n</script>\n"
        "<style>body { font-family: sans-serif; } table { border-spacing: 15px; }</style>\n"
        "</head>\n<body>\n{plot_divs}\n</body>\n</html>\n"
    )


def write_template(path: Path) -> Path:
    import vl_convert

    write_text(path, offline_template(vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)))
    return path


def dvc_plots_command(dvc_args: list[str], template: Path) -> list[str]:
    """`dvc plots <args> --html-template <template>`; `show` when no subcommand is given."""
    args = dvc_args or ["show"]
    if args[0] not in ("show", "diff"):
        raise UserError(f"lstm-textgen plots passes `show` or `diff` to dvc plots, got {args[0]!r}")
    return [sys.executable, "-m", "dvc", "plots", *args, "--html-template", str(template)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lstm-textgen plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed to `dvc plots` (default: show)")
    args = parser.parse_args(argv)
    if not Path(".dvc").is_dir():
        raise UserError("run lstm-textgen plots from the repository root (where .dvc/ is)")
    template = write_template(TEMPLATE)
    completed = subprocess.run(dvc_plots_command(args.dvc_args, template), check=False)
    if completed.returncode != 0:
        raise SystemExit(completed.returncode)
