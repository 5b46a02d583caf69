"""The names of a run's ``summary.json`` that readers share (the report, export and eval, the evidence
scripts): which accuracy is of which network, under the names summaries have had."""
from __future__ import annotations


def accuracies(summary: dict) -> dict:
    """The accuracies of a ``summary.json``, by the names it has had:

    ``test_acc``            of the network the run hands on (``checkpoint``): best.pt, chosen on the validation
                            split, when the run has one (data.val_split > 0); else last.pt, after the last epoch
    ``checkpoint``          "best.pt" or "last.pt": that network's file (what export and eval read by default)
    ``test_acc_final``      after the last epoch (last.pt)
    ``test_acc_max_epoch``  the best test accuracy of any epoch: chosen on the test set, optimistic

    Summaries written before these names (no ``test_acc_final``) held the final accuracy as ``test_acc``, the
    validation-selected one as ``selected.test_acc`` and the maximum as ``best_test_acc``."""
    if "test_acc_final" in summary:
        return {k: summary.get(k) for k in ("test_acc", "checkpoint", "test_acc_final", "test_acc_max_epoch")}
    final, sel = summary.get("test_acc"), summary.get("selected")
    chosen = sel.get("test_acc") if isinstance(sel, dict) and sel.get("by") == "val_acc" else None
    return {"test_acc": final if chosen is None else chosen, "checkpoint": "last.pt" if chosen is None else "best.pt",
            "test_acc_final": final, "test_acc_max_epoch": summary.get("best_test_acc")}
