"""``/v1/models``: upload (validated by loading it), list, get, delete uploaded models.

Validation loads the model in the API process; running it in a subprocess with memory and time
limits is not done yet (the config-versus-weights check refuses oversized configs cheaply).
"""

from __future__ import annotations

from bitplan.app.api.routes.blobs import blob_router
from bitplan.app.schemas import ModelRead, ModelsRead
from bitplan.app.settings import Settings
from bitplan.app.uploads import StoredUpload, validate_model

__all__ = ["router"]


def _validate(stored: StoredUpload, settings: Settings) -> None:
    validate_model(
        stored.path,
        filename=stored.filename,
        trusted=settings.trusted_models,
        cache_dir=settings.cache_dir,
    )


router = blob_router(
    kind="model", read_schema=ModelRead, list_schema=ModelsRead, validate=_validate
)
