"""Memory at run time: where inactive layers' optimizer state lives (:mod:`.residency`,
with its CUDA streams, :mod:`.streams`), training inside ``memory_budget=`` by
checkpointing per step only the blocks a step needs (:mod:`.budget`), and the
``memory_report`` of the coming step (:mod:`.report`), and the device's peak over a
stretch of work (:class:`PeakMemory`, :mod:`.peak`).

The offline planner (predicting a step's peak for any model shape, measuring one) is
:mod:`ist_optim.planner`; its names are re-exported here for code written when it lived
in this package (``from ist_optim.memory import MemoryPlanner`` keeps working).
"""

from ..planner import *  # noqa: F403  (the planner's names, re-exported)
from ..planner import __all__ as _planner_names
from .peak import PeakMemory

__all__ = [*_planner_names, "PeakMemory"]
