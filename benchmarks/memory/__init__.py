"""Peak memory and step time of IST's state policies against hand-frozen floors and BAdam
(``python -m benchmarks.memory``, :mod:`.peaks`), and the memory planner against what is
measured: H200 and accounted CPU peaks (:mod:`.planner`), ``memory_budget=`` steps
accounted on CPU (:mod:`.accounted`), and what ``budget_redraws`` buys
(:mod:`.budget_redraws`, predictions only).
"""
