"""Loading whole-segmentor checkpoints: hlbench's own, mmsegmentation 0.x and 1.x (mmengine), incl. the HL ones, and
the released U2PL and UniMatch DeepLabV3+ checkpoints."""

from pathlib import Path

from hlbench.errors import BadFileError
from hlbench.models.pretrained import MIN_LOADED_FRACTION, load_matching, read_torch_file, state_dict_of

# Checkpoint key prefix -> our key prefix (None: drop the key). Our Segmentor uses mmseg's module names, so only
# the differences are listed. Rules apply in order, so "module.weigh_head." becomes "hl_head.".
PREFIX_RENAMES = {
    "module.": "",                     # saved from a DDP-wrapped model
    "weigh_head.": "hl_head.",         # the authors' HL branch (sic, hl_encoder_decoder.py)
    "data_preprocessor.": None,        # mmseg 1.x mean/std buffers: normalisation is done by hlbench.data
}


def _conv_bn(theirs, ours, conv=0):
    """Their Sequential(conv, BN, ReLU, ...) with the conv at index `conv` -> our ConvBNReLU `ours`."""
    return {f"{theirs}{conv}.": f"{ours}conv.", f"{theirs}{conv + 1}.": f"{ours}bn."}


# The semi-supervised references' module names -> ours (heads.ASPPPlusHead, FCNHead; their backbone keys are
# ResNetV1s's). Applied after PREFIX_RENAMES; the first matching prefix wins.
U2PL_RENAMES = {  # u2pl/models/model_helper.py ModelBuilder: encoder, decoder (decoder.py dec_deeplabv3_plus), auxor
    "encoder.": "backbone.",
    **_conv_bn("decoder.aspp.conv1.", "decode_head.image_pool.1.", conv=1),  # (pool, conv, BN, ReLU)
    **_conv_bn("decoder.aspp.conv2.", "decode_head.aspp_modules.0."),
    **_conv_bn("decoder.aspp.conv3.", "decode_head.aspp_modules.1."),
    **_conv_bn("decoder.aspp.conv4.", "decode_head.aspp_modules.2."),
    **_conv_bn("decoder.aspp.conv5.", "decode_head.aspp_modules.3."),
    **_conv_bn("decoder.head.", "decode_head.bottleneck."),
    **_conv_bn("decoder.low_conv.", "decode_head.c1_bottleneck."),
    **_conv_bn("decoder.classifier.", "decode_head.fuse.0."),
    **_conv_bn("decoder.classifier.", "decode_head.fuse.2.", conv=4),
    "decoder.classifier.8.": "decode_head.conv_seg.",
    **_conv_bn("decoder.representation.", "decode_head.representation.0."),
    **_conv_bn("decoder.representation.", "decode_head.representation.2.", conv=4),
    "decoder.representation.8.": "decode_head.representation.4.",
    **_conv_bn("auxor.aux.", "auxiliary_head.convs.0."),
    "auxor.aux.4.": "auxiliary_head.conv_seg.",
}
UNIMATCH_RENAMES = {  # model/semseg/deeplabv3plus.py DeepLabV3Plus: backbone, head (ASPP), reduce, fuse, classifier
    **_conv_bn("head.b0.", "decode_head.aspp_modules.0."),
    **_conv_bn("head.b1.", "decode_head.aspp_modules.1."),
    **_conv_bn("head.b2.", "decode_head.aspp_modules.2."),
    **_conv_bn("head.b3.", "decode_head.aspp_modules.3."),
    **_conv_bn("head.b4.gap.", "decode_head.image_pool.1.", conv=1),  # (pool, conv, BN, ReLU)
    **_conv_bn("head.project.", "decode_head.bottleneck."),
    **_conv_bn("reduce.", "decode_head.c1_bottleneck."),
    **_conv_bn("fuse.", "decode_head.fuse.0."),
    **_conv_bn("fuse.", "decode_head.fuse.2.", conv=3),
    "classifier.": "decode_head.conv_seg.",
}
# A key prefix that only one reference's checkpoints have (after PREFIX_RENAMES) -> that reference's renames.
REFERENCE_RENAMES = {"decoder.aspp.": U2PL_RENAMES, "head.b4.": UNIMATCH_RENAMES}


def map_checkpoint_keys(state: dict) -> dict:
    """Rename checkpoint keys to hlbench's module names with PREFIX_RENAMES, then with the renames of the reference
    (U2PL, UniMatch) whose keys they are, if any; dropped keys are left out."""
    out = {}
    for key, value in state.items():
        for old, new in PREFIX_RENAMES.items():
            if key.startswith(old):
                if new is None:
                    break
                key = new + key[len(old):]
        else:
            out[key] = value
    for signature, renames in REFERENCE_RENAMES.items():
        if any(key.startswith(signature) for key in out):
            return {_renamed(key, renames): value for key, value in out.items()}
    return out


def _renamed(key, renames):
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _select(ckpt, which, path):
    """The weights `which` names. U2PL's train_semi.py saves {"model_state": student, "teacher_state": EMA teacher};
    its reported numbers are the teacher's, hence the default. Other checkpoints hold one model."""
    if which not in (None, "student", "teacher"):
        raise ValueError(f"which must be 'student', 'teacher' or None, got {which!r}")
    has_teacher = isinstance(ckpt, dict) and "teacher_state" in ckpt
    if which == "teacher" and not has_teacher:
        raise BadFileError(f"{path}: no teacher weights in this checkpoint (U2PL's keep them under 'teacher_state')")
    if has_teacher and which != "student":
        return ckpt["teacher_state"]
    if isinstance(ckpt, dict) and "model_state" in ckpt:  # U2PL's student, or its supervised-only model
        return ckpt["model_state"]
    return ckpt


def load_checkpoint(model, path, which=None, *, require_all=False) -> dict:
    """Load a segmentor checkpoint into `model`; returns {"loaded", "missing", "unexpected"} key lists.

    Args:
        which: "student" or "teacher" for checkpoints that hold both (U2PL's); None takes the teacher where there
            is one, else the only model.
        require_all: every tensor of `model` must be in the checkpoint, as when rebuilding a trained model to
            score it; False allows a partial start (a baseline's weights in a model with an HL head).

    Raises MissingInputError when `path` is missing, BadFileError on shape mismatches, when fewer than
    MIN_LOADED_FRACTION (with require_all: not all) of the model's tensors are in the checkpoint, or when `which`
    names weights it lacks.
    """
    path = Path(path)
    state = state_dict_of(_select(read_torch_file(path), which, path), path)
    report = load_matching(model, map_checkpoint_keys(state), path, MIN_LOADED_FRACTION)
    if require_all and report["missing"]:
        missing = report["missing"]
        raise BadFileError(f"{path}: {len(missing)} of the model's tensors are not in it (e.g. "
                           f"{', '.join(missing[:3])}); was it saved from another model or hl setting?")
    return report
