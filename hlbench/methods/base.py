"""The method interface the shared train loop drives (hlbench.engine.trainer).

A method owns what is particular to it: its data streams, its losses, any extra state (an EMA teacher, memory
queues) and which network (student or teacher) is evaluated. The loop owns everything else: loaders,
accumulation, the schedule, checkpoints (which store `state_dict()`), evaluation and tracking.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from hlbench.engine.param_groups import param_groups
from hlbench.errors import BadFileError, ConfigError


@dataclass(frozen=True)
class Stream:
    """One training data stream: a data set and its GLOBAL batch, kept whatever the number of devices.

    Args:
        key: the config key the batch comes from, named in batch-plan errors.
    """
    dataset: torch.utils.data.Dataset
    batch_size: int
    key: str = "train.batch_size"


class Method:
    """Base class of training methods. Subclasses implement `streams` and `step`; the rest has defaults.

    The loop calls, in order: `streams(datasets)`, `setup(model, plan)` once the batch plan is known, then per
    iteration `step(model, batches, it)` for every accumulation step and `after_step(model, it)` after the
    optimiser step; `eval_model(model)` before each evaluation; `state_dict()` at each checkpoint and
    `load_state_dict()` on resume.
    """

    name = "method"
    # The losses HL may weight (hl.semisup.apply_to), checked against the running method at start: "sup" is the
    # labelled loss; a method adds its own streams.
    hl_streams: tuple[str, ...] = ("sup",)

    def __init__(self, cfg):
        self.cfg = cfg
        # Where HL enters this run's losses: none without an HL branch (L_h still trains it from the labelled loss).
        self.hl_targets = set(cfg.hl.semisup.apply_to) if cfg.hl.enabled else set()

    def streams(self, datasets: dict) -> dict[str, Stream]:
        """{stream name: Stream} from the built data sets ({"train", "val"}); the first stream leads the plan."""
        raise NotImplementedError

    def setup(self, model: torch.nn.Module, plan) -> None:
        """Called once with the model (unwrapped) and the loop's BatchPlan (per-device batches, accumulation)."""

    def step(self, model, batches: dict[str, dict], it: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to backpropagate, {log key: scalar tensor}) for one micro-batch of every stream.

        `model` is what the loop trains (DDP-wrapped or compiled); `it` is the 0-based iteration.
        """
        raise NotImplementedError

    def after_step(self, model: torch.nn.Module, it: int) -> None:
        """After the optimiser step of iteration `it` (1-based count of steps done), e.g. an EMA update."""

    def eval_model(self, model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
        """(module to evaluate, "student" | "teacher"): which network produces the reported numbers."""
        return model, "student"

    def lr_multipliers(self) -> dict[str, float]:
        """{parameter-name prefix: lr multiplier}, on top of the recipe's optim.paramwise; the HL branch's comes from
        hl.lr_mult, others from method.lr_mult."""
        mults = {str(k): float(v) for k, v in (self.cfg.method.get("lr_mult") or {}).items()}
        return {"hl_head.": float(self.cfg.hl.lr_mult), **mults}

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        """Optimiser param groups [{"params", "lr_mult", "decay_mult"}] (engine/param_groups.py decides each
        parameter's multipliers from optim.paramwise and lr_multipliers())."""
        return param_groups(model, OmegaConf.select(self.cfg, "optim.paramwise"), self.lr_multipliers())

    def select_from(self) -> str:
        """Which periodic evaluations may select best.pth when eval.select_from is null: all | final_protocol."""
        return "all"

    def describe(self) -> dict:
        """Facts for the start-up log, env.json and the summary (e.g. the HL normaliser in force)."""
        return {"method": self.name}

    def tags(self) -> list[str]:
        """Extra W&B tags."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise BadFileError(f"method {self.name!r} has no state, but the checkpoint holds {sorted(state)}")

    def rank_state_dict(self) -> dict:
        """State that differs between processes (e.g. BatchNorm statistics of a network DDP does not wrap); every
        rank's is saved, on CPU, and each rank restores its own when the world size is unchanged."""
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        """This rank's `rank_state_dict()` from the checkpoint."""


def resolve_behaviour_flags(method_cfg, behaviours: dict, choices: dict, method: str) -> dict:
    """method.behaviour's flag values (behaviours[behaviour]) with the non-null method.flags overrides applied;
    a ValueError naming the key for an unknown behaviour, flag or value (choices: flag -> allowed values)."""
    behaviour = method_cfg.behaviour
    if behaviour not in behaviours:
        raise ConfigError(f"method.behaviour={behaviour!r} is not valid; expected one of {', '.join(behaviours)}")
    flags = dict(behaviours[behaviour])
    for key, value in (method_cfg.flags or {}).items():
        if key not in flags:
            raise ConfigError(f"method.flags.{key} is not a {method} flag; expected one of {', '.join(flags)}")
        if value is not None:
            if key in choices and value not in choices[key]:
                raise ConfigError(f"method.flags.{key}={value!r} is not valid; expected one of "
                                  f"{', '.join(choices[key])}")
            flags[key] = value
    return flags
