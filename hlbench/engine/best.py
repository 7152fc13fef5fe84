"""Best-checkpoint selection: the best evaluation so far, the weights that produced it (checkpoints/best.pth), and
their score under the final protocol when another protocol selected them."""
from __future__ import annotations

import copy
from typing import Callable

from .checkpoint import Checkpoints, load_state
from .distributed import barrier
from ..metrics import table_metric
from .summary import summary_entry


class BestSelection:
    """Args:
        select_from: which evaluations may select: all (the references compare scores across protocols) or
            final_protocol (eval.select_from, or the method's rule when that is null).
        final_protocol: the recipe's protocol (protocol_of(cfg.eval)).
        checkpoints: where best.pth goes (rank 0 writes it).
        best: the selection restored from a checkpoint.
    """

    def __init__(self, select_from: str, final_protocol: dict, classes: list[str], checkpoints: Checkpoints,
                 is_main: bool, best: dict | None = None):
        self.select_from, self.final_protocol, self.classes = select_from, final_protocol, classes
        self.checkpoints, self.is_main = checkpoints, is_main
        self.best = best

    def update(self, it: int, result: dict, method, model) -> None:
        """Keep `result` (an evaluation after iteration `it`) and the method's eval weights if it is the best."""
        metrics = result["metrics"]
        if self.select_from == "final_protocol" and result["protocol"] != self.final_protocol:
            return
        key = table_metric(metrics)  # the data set's table metric: TotalText's best is its best fgIoU
        if self.best is not None and not metrics[key] > self.best[key]:
            return
        module, network = method.eval_model(model)
        if self.is_main:
            self.checkpoints.write({"model": module.state_dict(), "iter": it, "network": network},
                                   self.checkpoints.best_path)
        self.best = summary_entry(it, metrics, result["protocol"], f"checkpoints/best.pth (iter {it})", network,
                                  self.classes)

    def rescore(self, score: Callable, method, model) -> None:
        """Score the selected weights with the final protocol where another protocol selected them (U2PL's eval.py
        on ckpt_best.pth); `score(module)` evaluates a module. The summary keeps both numbers."""
        selected_by = {k: v for k, v in (self.best or {}).get("protocol", {}).items()
                       if k not in ("checkpoint", "network")}
        if self.best is None or selected_by == self.final_protocol:
            return
        barrier()  # rank 0 wrote best.pth; every rank scores its shard of the val set with those weights
        module = copy.deepcopy(method.eval_model(model)[0])
        module.load_state_dict(load_state(self.checkpoints.best_path)["model"])
        result = score(module)
        self.best["rescored"] = summary_entry(self.best["iter"], result["metrics"], self.final_protocol,
                                              self.best["protocol"]["checkpoint"], self.best["protocol"]["network"],
                                              self.classes)
