"""The ``shapcam`` command: the science commands plus those of the layers above them.

``shapcam.cli`` knows only the science layer; this module (top of the import graph) adds the
storage commands, and the orchestration commands when they land.
"""

from __future__ import annotations

from shapcam.cli import app
from storage.cli import query

app.command()(query)

__all__ = ["app"]
