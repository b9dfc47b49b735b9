"""Per-layer importance: the score update (:mod:`.scores`), the registered estimators'
rounds (:mod:`.rounds`, :mod:`.estimators`), response suppression (:mod:`.suppression`)
and the batches the rounds measure on (:mod:`.batches`)."""
