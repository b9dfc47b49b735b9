"""Per-layer importance: the round every estimator runs (:mod:`.rounds`), one module per
estimator with its math (:mod:`.paper`, :mod:`.normalized`, :mod:`.first_order`), the
shared score update (:mod:`.scores`), response suppression (:mod:`.suppression`) and the
batches the rounds measure on (:mod:`.batches`)."""

# The built-in estimators register themselves in this order, the default first: the order
# ``ist_optim.registry.estimator_names()`` and the option's error messages list them in.
# isort: off
from . import paper, normalized, first_order  # noqa: F401
# isort: on
