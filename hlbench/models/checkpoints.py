"""Loading whole-segmentor checkpoints: hlbench's own, mmsegmentation 0.x and 1.x (mmengine), incl. the HL ones."""

from pathlib import Path

from hlbench.models.pretrained import MIN_LOADED_FRACTION, load_matching, read_torch_file, state_dict_of

# Checkpoint key prefix -> our key prefix (None: drop the key). Our Segmentor uses mmseg's module names, so only
# the differences are listed. Rules apply in order, so "module.weigh_head." becomes "hl_head.".
PREFIX_RENAMES = {
    "module.": "",                     # saved from a DDP-wrapped model
    "weigh_head.": "hl_head.",         # the authors' HL branch (sic, method.md §3)
    "data_preprocessor.": None,        # mmseg 1.x mean/std buffers: normalisation is done by hlbench.data
}

def map_checkpoint_keys(state: dict) -> dict:
    """Rename checkpoint keys to hlbench's module names with PREFIX_RENAMES; dropped keys are left out."""
    out = {}
    for key, value in state.items():
        for old, new in PREFIX_RENAMES.items():
            if key.startswith(old):
                if new is None:
                    break
                key = new + key[len(old):]
        else:
            out[key] = value
    return out


def load_checkpoint(model, path) -> dict:
    """Load a segmentor checkpoint into `model`; returns {"loaded", "missing", "unexpected"} key lists.

    Raises FileNotFoundError when `path` is missing, ValueError on shape mismatches or when fewer than
    MIN_LOADED_FRACTION of the model's tensors are in the checkpoint.
    """
    path = Path(path)
    return load_matching(model, map_checkpoint_keys(state_dict_of(read_torch_file(path), path)), path,
                         MIN_LOADED_FRACTION)
