"""Exception types raised by hawq.

Every error a user can cause raises a subclass of :class:`HawqError` whose message names the
argument or layer at fault, what was given, and what to do instead.
"""

from __future__ import annotations

__all__ = ["BudgetError", "ConfigError", "DataError", "HawqError", "NumericalError",
           "UnsupportedLayerError"]


class HawqError(Exception):
    """Base class of every error hawq raises on purpose."""


class ConfigError(HawqError, ValueError):
    """An argument, bit width or plan entry is invalid."""


class UnsupportedLayerError(HawqError):
    """A layer cannot be quantized or differentiated twice; the message names it."""


class BudgetError(HawqError, ValueError):
    """A size/BOPs/latency budget cannot be met; the message gives the smallest feasible value."""


class DataError(HawqError, FileNotFoundError):
    """A data or weight file is missing or malformed; the message says what to pass."""


class NumericalError(HawqError, ArithmeticError):
    """A loss or estimate became NaN/inf; the message gives the batch index."""
