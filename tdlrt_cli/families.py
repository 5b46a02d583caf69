"""The methods of ``method=...`` by family, declared once: every module (and test) that asks "is this method
rank-adaptive, fixed-rank, pruned?" reads these tuples. Plain names, no import: `tdlrt` checks its input before
torch is imported."""
RANK_ADAPTIVE = ("tdlrt", "dlrt")  # trained by the TDLRT integrator (the tau rule and the target rule)
PRUNED = ("tucker_prune",)         # Tucker layers whose ranks are cut on the target rule's schedule, no integrator
FIXED_RANK = ("tucker", "cp", "tt", "matrix")  # factorised at fixed ranks (lowrank.baselines.FIXED: its layer kinds)
PRUNING = ("snip", "grasp", "imp")  # unstructured weight pruning (masks)
DENSE = ("dense",)
# every method, in the order the report lists them
METHODS = ("dense", "tdlrt", "dlrt", "tucker", "tucker_prune", "cp", "tt", "matrix", "snip", "grasp", "imp")
assert sorted(METHODS) == sorted(DENSE + RANK_ADAPTIVE + PRUNED + FIXED_RANK + PRUNING), "a method in no family"
