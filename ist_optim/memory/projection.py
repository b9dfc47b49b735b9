"""Moved to :mod:`ist_optim.planner.projection` (the offline planner has its own package); this
module re-exports its names for code that imports them from here."""

from ..planner.projection import (
    PROJECTED_OPTIMIZERS,
    ProjectionSpec,
    projected_step,
)

__all__ = ["PROJECTED_OPTIMIZERS", "ProjectionSpec", "projected_step"]
