"""IST under ``torch.distributed`` (DDP, FSDP2).

What a user calls:

* :func:`check_ranks_agree`: compare every rank's IST state (a collective);
* :func:`skip_inactive_buckets`: a DDP communication hook that skips buckets of inactive
  layers;
* :func:`get_optimizer_state_dict` / :func:`set_optimizer_state_dict`: checkpoints through
  ``torch.distributed.checkpoint``.

The rank helpers the optimizer composes live in :mod:`.ranks`, the DCP helpers in
:mod:`.checkpoint`. See docs/distributed.md.
"""

from .checkpoint import get_optimizer_state_dict, set_optimizer_state_dict
from .ranks import check_ranks_agree, skip_inactive_buckets

__all__ = [
    "check_ranks_agree",
    "get_optimizer_state_dict",
    "set_optimizer_state_dict",
    "skip_inactive_buckets",
]
