"""Which layers train: the sampler that draws the active set from its scores and generator
(:mod:`.sampler`; the activator applies and records the set), the registered sampling rules
(:mod:`.rules`), the draws they use (:mod:`.draws`) and the active-set schedule
(:mod:`.schedule`)."""
