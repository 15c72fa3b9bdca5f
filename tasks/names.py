"""The names a user reads for a run's outputs: shared vocabulary at the bottom of the layering.

The store, the flows and the readers (table, inspect, report, export) all name an output the
same way; this module imports nothing of tokenclean, so any of them can use it.
"""
from __future__ import annotations

import re

SELF_EVOLVING = "self-evolving"
REFERENCE = "reference"  # theta_1: trained on D0, or the given model.reference
REFERENCE_D0 = "reference-d0"  # the self-evolving loop's theta_1 trained on D0, in a run that also has a given one
# A k sweep names each k-dependent variant with its k: ``global-k0.3``, ``self-evolving-k0.3@2``.
_AT_K = re.compile(r"^(?P<variant>.+)-k(?P<k>[0-9.]+(?:e-?[0-9]+)?)$")


def label(variant: str, iteration: int) -> str:
    """The one name a user reads for an output: ``global``, ``reference``, ``self-evolving@2``."""
    return f"{variant}@{iteration}" if method_of(variant) == SELF_EVOLVING else variant


def at_k(variant: str, k: float | None) -> str:
    """``variant`` at ``k`` in a sweep (``global-k0.3``); ``k`` None: the variant does not depend on k."""
    if k is None:
        return variant
    text = repr(float(k))  # round-trips, so two k of a sweep never share a name
    return f"{variant}-k{text.removesuffix('.0')}"


def split_k(variant: str) -> tuple[str, float | None]:
    """(the variant without its k, the k a sweep ran it at, or None): the inverse of ``at_k``."""
    m = _AT_K.match(variant)
    return (m["variant"], float(m["k"])) if m else (variant, None)


def method_of(variant: str) -> str:
    return split_k(variant)[0]
