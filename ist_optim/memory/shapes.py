"""Moved to :mod:`ist_optim.planner.shapes` (the offline planner has its own package); this
module re-exports its names for code that imports them from here."""

from ..planner.shapes import (
    SHAPES,
    load_config,
)

__all__ = ["SHAPES", "load_config"]
