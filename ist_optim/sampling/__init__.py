"""Which layers train: the sampler that owns the active set (:mod:`.sampler`), the
registered sampling rules (:mod:`.rules`), the draws they use (:mod:`.draws`) and the
active-set schedule (:mod:`.schedule`)."""
