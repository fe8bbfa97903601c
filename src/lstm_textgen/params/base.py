"""What every section of the schema shares: the frozen, strict base model, the error that names every
bad key, and the markers that declare a setting's roles beside its type and default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from lstm_textgen.errors import UserError

SHA256_PATTERN = r"^[0-9a-f]{64}$"
# Field markers, read by `marked_keys`: a setting's roles are declared beside its type and default.
SHAPE = {"shape": True}  # decides the weights' shapes: a fine-tuned model must keep the source's value
RESUMABLE = {"resumable": True}  # where a run goes on, how long, how watched: may change on resume


class ParamsError(UserError):
    """params.yaml does not validate; the message lists every problem, one per line. `field` names
    the setting when one is at fault (a server answers with it as OpenAI's `param`)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
