"""Data for ofa-lightning: record sources and the Lightning datamodules.

``datamodules.sources``     ShapesWorldSource, JsonlSource, MemorySource (the RecordSource protocol)
``datamodules.multitask``   MultiTaskDataModule (a weighted task mixture), TaskDataModule (one task)
``datamodules.shapes_world`` the procedural ShapesWorld scenes

The names below are imported on first use, so ``import datamodules.shapes_world`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ShapesWorldSource": "datamodules.sources",
    "JsonlSource": "datamodules.sources",
    "MemorySource": "datamodules.sources",
    "MultiTaskDataModule": "datamodules.multitask",
    "TaskDataModule": "datamodules.multitask",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
