"""Finite numbers: the click parameter type every float option of every command is (a rule is a type).

A foundation module (it imports only click), so `edgeres.settings` can use it at import time; edgeres/cli/types.py
re-exports it for the commands.

click's FloatRange lets `nan`, `inf` and `1e308` through: every comparison with nan is false, so nan passes any
range, and an option without an upper bound takes infinity. A timeout of nan or inf then waits forever. Every float
option of every command is a FiniteFloat instead; tests/test_bad_inputs.py walks the command tree to prove it.
"""
from __future__ import annotations

import math

import click

LARGEST = 1e9   # no float setting of edgeres means anything past this magnitude: a larger value is a typo


class FiniteFloat(click.FloatRange):
    """A finite float within [min, max] (open ends as click.FloatRange) and at most LARGEST in magnitude; -0 is 0.
    NaN, infinities and huge values are a usage error naming the option (exit 2)."""

    name = "float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if abs(number) > LARGEST:
            self.fail(f"{value!r} is too large (at most {LARGEST:g} in magnitude)", param, ctx)
        return super().convert(number + 0.0, param, ctx)   # + 0.0: -0.0 becomes 0.0
