"""``/v1/models``: upload (validated by loading it), list, get, delete uploaded models."""

from __future__ import annotations

from app.api.routes.blobs import blob_router
from app.schemas import ModelRead, ModelsRead
from app.settings import Settings
from app.uploads import StoredUpload, validate_model

__all__ = ["router"]


def _validate(stored: StoredUpload, settings: Settings) -> None:
    validate_model(stored.path, filename=stored.filename, trusted=settings.trusted_models,
                   cache_dir=settings.cache_dir)


router = blob_router(kind="model", read_schema=ModelRead, list_schema=ModelsRead,
                     validate=_validate)
