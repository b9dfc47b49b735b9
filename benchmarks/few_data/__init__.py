"""Few data over several epochs, with a multiple-choice next-line accuracy task.

``python -m benchmarks.few_data`` (:mod:`.epochs`; the task: :mod:`.next_line`);
``run_all.sh`` runs the published configuration, most important runs first.
"""
