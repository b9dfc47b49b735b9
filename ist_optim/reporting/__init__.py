"""What a run shows: the importance history (:mod:`.history`) and its plot
(:mod:`.plotting`)."""
