"""The science layer's one error type."""

from __future__ import annotations


class ShapCAMError(ValueError):
    """Bad input to the library: the message says what was given and what would work.

    The command layer prints it as one line (no traceback); library users catch it.
    """
