"""The warning of the non-finite policy (``docs/ARCHITECTURE.md``, "Non-finite values").

Where onerec_fast drops non-finite values instead of raising (NaN beam-search scores, non-finite ECPO rewards)
it warns with :class:`NonFiniteWarning`; ``warnings.simplefilter("error", NonFiniteWarning)`` turns those into
errors. Imports nothing of onerec_fast: every layer may use it.
"""

from __future__ import annotations

__all__ = ["NonFiniteWarning"]


class NonFiniteWarning(RuntimeWarning):
    """Non-finite values (NaN, or inf where only finite values mean something) were left out of a result."""
