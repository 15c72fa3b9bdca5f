"""The names a user reads for a run's outputs: shared vocabulary at the bottom of the layering.

The store, the flows and the readers (table, inspect, report, export) all name an output the
same way; this module imports nothing of tokenclean, so any of them can use it.
"""
from __future__ import annotations


def label(variant: str, iteration: int) -> str:
    """The one name a user reads for an output: ``global``, ``reference``, ``self-evolving@2``."""
    return f"{variant}@{iteration}" if variant == "self-evolving" else variant
