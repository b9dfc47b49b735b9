"""Inside one memory budget, which method gives the best model for the time spent?

``python -m benchmarks.budget`` (:mod:`.cli`, the command line); its parts, each read on
its own: :mod:`.methods` (the methods and their rate grids), :mod:`.plan` (what is left to
run, from the rows already written), :mod:`.run` (the data, one measured run, the budget,
the fit check, the loop over the runs left) and :mod:`.report` (tables and curves; rows of
one protocol at a time).
"""
