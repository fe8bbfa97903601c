"""The served model: an MLflow pyfunc model built from code (`entry.py`), with its request checks."""


def __getattr__(name: str) -> object:
    """Models registered before the package had folders build themselves with
    `from lstm_textgen.serving import TextGenerator`; where this package is already imported (the
    demo, `lstm-textgen score`), that line finds the class here."""
    if name == "TextGenerator":
        from lstm_textgen.serving.model import TextGenerator

        return TextGenerator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
