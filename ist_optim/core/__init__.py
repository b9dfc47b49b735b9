"""The layer machinery: which parameters form each layer (:mod:`.groups`), applying an
active set (:mod:`.activator`, :mod:`.backward`), the torch optimizer contract
(:mod:`.wrapper`), the ``"ist"`` checkpoint entry (:mod:`.checkpoint`) and per-block
compilation (:mod:`.compile`)."""
