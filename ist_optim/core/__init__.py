"""The layer machinery: which parameters form each layer (:mod:`.groups`), applying an
active set (:mod:`.activator`, :mod:`.backward`), per-block recomputation switched per step
(:mod:`.recompute`) and compilation (:mod:`.compile`), the torch optimizer contract
(:mod:`.wrapper`), parameters a wrapper swapped after construction (:mod:`.follow`) and the
``"ist"`` checkpoint entry (:mod:`.checkpoint`)."""
