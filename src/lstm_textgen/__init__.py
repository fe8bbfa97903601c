"""lstm-textgen: recurrent language models from corpus to served model, reproducibly."""
