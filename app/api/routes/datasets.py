"""``/v1/datasets``: upload (format-checked), list, get, delete calibration datasets."""

from __future__ import annotations

from bitplan.app.api.routes.blobs import blob_router
from bitplan.app.schemas import DatasetRead, DatasetsRead
from bitplan.app.validation import validate_dataset

__all__ = ["router"]

router = blob_router(
    kind="dataset", read_schema=DatasetRead, list_schema=DatasetsRead, validate=validate_dataset
)
