"""IST under torch.compile: compile counts and step time (``python -m benchmarks.compile``,
:mod:`.steps`)."""
