"""lstm-textgen: recurrent language models from corpus to served model, reproducibly."""

__version__ = "0.1.0"
