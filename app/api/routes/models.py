"""``/v1/models``: upload (validated by loading it in a child process with limits, see
:mod:`bitplan.app.validation`), list, get, delete uploaded models."""

from __future__ import annotations

from bitplan.app.api.routes.blobs import blob_router
from bitplan.app.schemas import ModelRead, ModelsRead
from bitplan.app.validation import validate_model

__all__ = ["router"]

router = blob_router(
    kind="model",
    read_schema=ModelRead,
    list_schema=ModelsRead,
    validate=validate_model,
    always_in_child=True,
)
