"""``/v1/datasets``: upload (format-checked), list, get, delete calibration datasets."""

from __future__ import annotations

from bitplan.app.api.routes.blobs import blob_router
from bitplan.app.schemas import DatasetRead, DatasetsRead
from bitplan.app.settings import Settings
from bitplan.app.uploads import StoredUpload, validate_dataset

__all__ = ["router"]


def _validate(stored: StoredUpload, settings: Settings) -> None:
    validate_dataset(stored.path, filename=stored.filename)


router = blob_router(
    kind="dataset", read_schema=DatasetRead, list_schema=DatasetsRead, validate=_validate
)
