"""Click parameter types every command shares: one rule per kind of value, written once (a rule is a type).

FiniteFloat lives in edgeres/numbers.py (a foundation module, so the settings that generate options can use it);
it is re-exported here for the commands.
"""
from __future__ import annotations

from edgeres.numbers import LARGEST, FiniteFloat

__all__ = ["FiniteFloat", "LARGEST"]
