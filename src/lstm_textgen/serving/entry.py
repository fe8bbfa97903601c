"""MLflow models-from-code entry: MLflow runs this file to build the model object (no pickle)."""

import mlflow.models

from lstm_textgen.serving.model import TextGenerator

mlflow.models.set_model(TextGenerator())
