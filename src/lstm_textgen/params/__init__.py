"""The params.yaml schema: the only place that knows which keys exist, their types, ranges and defaults.

params.yaml is validated once at the start of every stage into frozen, typed objects. An unknown key,
a wrong type or a value out of range raises `ParamsError` whose message names the key, the bad value
and what is allowed, e.g. ``model.cel: unknown key (did you mean model.cell?)``.

In parts: `base.py` (the base model, the error, role markers), `sections.py` (corpus, data, download,
model, train, evaluate, register), `sampling.py` (how a text is drawn), `search.py` (tune),
`root.py` (`Params`, the checks across sections) and `loading.py` (reading, settings, flattening).
This file is the package's one interface: import from `lstm_textgen.params`.
"""

from lstm_textgen.params.base import RESUMABLE, SHAPE, ParamsError
from lstm_textgen.params.loading import (
    flatten,
    load_params,
    marked_keys,
    parse_params,
    scalar_type,
    with_settings,
)
from lstm_textgen.params.root import Params
from lstm_textgen.params.sampling import SampleParams, Sampling, text_problem
from lstm_textgen.params.search import SearchDimension, TuneParams
from lstm_textgen.params.sections import (
    CorpusSpec,
    DataParams,
    DownloadParams,
    EvaluateParams,
    ModelParams,
    RegisterParams,
    TrainParams,
)

__all__ = [
    "RESUMABLE",
    "SHAPE",
    "CorpusSpec",
    "DataParams",
    "DownloadParams",
    "EvaluateParams",
    "ModelParams",
    "Params",
    "ParamsError",
    "RegisterParams",
    "SampleParams",
    "Sampling",
    "SearchDimension",
    "TrainParams",
    "TuneParams",
    "flatten",
    "load_params",
    "marked_keys",
    "parse_params",
    "scalar_type",
    "text_problem",
    "with_settings",
]
