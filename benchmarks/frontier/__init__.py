"""The memory-time frontier on CPU (issue 35): at each budget between LoRA + GC's peak and
LoRA's peak without checkpointing, the step time of every way to fit, and each method's
held-out loss at a fixed CPU time.

``python -m benchmarks.frontier`` (:mod:`.cli`, the command line); its parts, each read on
its own: :mod:`.budgets` (the budgets between the two peaks, the blocks a budget forces to
be recomputed), :mod:`.methods` (the methods timed and how each fits a budget),
:mod:`.timing` (the interleaved order and the timed steps), :mod:`.run` (the peaks, the
fit of each method at a budget, the loop over the budgets left) and :mod:`.report` (the
ideal time, the loss at a fixed CPU time from the budget study's curves, the tables and
the plot).
"""
