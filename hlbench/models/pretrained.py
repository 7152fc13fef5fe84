"""Loading pretrained weights (ImageNet backbones, mmseg checkpoints) with a report of what matched."""

import logging
import pickle
from pathlib import Path

import torch

from hlbench.errors import BadFileError, MissingInputError

log = logging.getLogger(__name__)

# A checkpoint that fills less than this share of the module's tensors is the wrong file, not a partial match.
MIN_LOADED_FRACTION = 0.5


def read_torch_file(path, *, safe_first: bool = True, map_location="cpu", what: str = "checkpoint"):
    """torch.load a local checkpoint; MissingInputError when missing, a one-line BadFileError naming it when
    unreadable.

    With `safe_first`, the safe loader (weights_only=True) is tried first; checkpoints that pickle non-tensor
    objects (mmengine's message_hub and meta, our RNG state) then load in full, which is acceptable for a local
    file the user chose, and only after the safe load failed.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} not found: {path}")
    if safe_first:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            log.info("%s: not loadable with weights_only=True, loading it in full (trusted local file)", path)
        except Exception as err:  # truncated or not a torch file: torch raises RuntimeError, EOFError, ...
            raise BadFileError(f"{path}: not a readable PyTorch checkpoint ({_first_line(err)})") from err
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise BadFileError(f"{path}: not a readable PyTorch checkpoint ({_first_line(err)})") from err


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:120]}" if text else type(err).__name__


def state_dict_of(ckpt, path) -> dict:
    """The weights inside a loaded checkpoint: hlbench's {"model": ...}, mmseg's {"state_dict": ...} or a bare
    state dict; a one-line BadFileError naming `path` otherwise."""
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not ckpt or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise BadFileError(f"{path}: expected {{'model': state_dict}}, {{'state_dict': state_dict}} or a state dict "
                           "of tensors")
    return ckpt


def load_pretrained(module, path, expected_prefix=""):
    """Load matching tensors from `path` into `module`; returns {"loaded", "missing", "unexpected"} key lists.

    A leading "module." (DDP) or "backbone." (mmseg segmentor checkpoint) is stripped from checkpoint keys unless
    the module's own keys carry it. With `expected_prefix` (e.g. "weigh_head." for the released HL checkpoints)
    only keys under that prefix are used, with the prefix removed. Raises BadFileError on shape mismatches or when
    fewer than MIN_LOADED_FRACTION of the module's tensors are found.
    """
    path = Path(path)
    state = state_dict_of(read_torch_file(path, what="pretrained checkpoint"), path)
    own = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    for prefix in ("module.", "backbone."):
        if not any(k.startswith(prefix) for k in own):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    if expected_prefix:
        state = {k.removeprefix(expected_prefix): v for k, v in state.items() if k.startswith(expected_prefix)}
    return load_matching(module, state, path, MIN_LOADED_FRACTION)


def load_matching(module, state, path, min_fraction):
    """Copy the tensors of `state` whose names are in `module`; returns {"loaded", "missing", "unexpected"}.

    Raises BadFileError naming `path` on shape mismatches or when fewer than `min_fraction` of the module's
    tensors are found. BN batch counters are ignored: they are not weights and older checkpoints lack them.
    """
    own = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise BadFileError(f"{path}: {len(mismatched)} shape mismatches, e.g. {'; '.join(mismatched[:3])}")
    loaded = [k for k in own if k in state]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if len(loaded) < min_fraction * len(own):
        raise BadFileError(f"{path}: only {len(loaded)}/{len(own)} tensors of {type(module).__name__} match "
                           f"(need {min_fraction:.0%}); missing e.g. {missing[:3]}, unexpected e.g. {unexpected[:3]}")
    module.load_state_dict({k: state[k] for k in loaded}, strict=False)
    log.info("loaded %d/%d tensors from %s", len(loaded), len(own), path)
    if missing:
        log.warning("missing in %s (%d): %s", path, len(missing), missing)
    if unexpected:
        log.info("unused from %s (%d): %s", path, len(unexpected), unexpected)
    return {"loaded": loaded, "missing": missing, "unexpected": unexpected}
