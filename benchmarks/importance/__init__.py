"""Importance estimators and depth-aware sampling on a random Llama: step time of
depth-aware draws (:mod:`.depth_sampling`), the first-order estimator's agreement with
suppression and its cost (:mod:`.first_order_agreement`), and the estimators' sampling
spread (:mod:`.estimator_spread`); each ``python -m benchmarks.importance.<name>``.
"""
