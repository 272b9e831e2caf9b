"""Pruning plans (pure: scores + target -> kept units) and surgery (plan + model -> model).

Every criterion (x-pruner masks, magnitude, taylor, random) produces :class:`UnitScores`; one
planner turns any of them into kept units at an exact MAC budget, so comparisons are at equal MACs
through the same surgery and export path.
"""
