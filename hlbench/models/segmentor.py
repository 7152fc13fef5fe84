"""Encoder-decoder segmentor with optional auxiliary and HL heads; whole-image and sliding-window inference."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlbench.errors import ConfigError
from hlbench.models.heads import resize


def window_starts(size, crop, stride):
    """Window start offsets along one axis, as mmseg's slide_inference: border windows are shifted inside."""
    num = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(num)]


# whole: one pass; slide: mmseg's / U2PL's windows shifted inside the image, logits averaged; slide_truncated:
# UniMatch's windows cut at the border, probabilities summed.
PREDICT_MODES = ("whole", "slide", "slide_truncated")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class AuxiliaryHeads(nn.ModuleList):
    """mmseg's list of auxiliary heads (checkpoint keys auxiliary_head.<i>.*, as BiSeNetV2's four): their logits
    under "aux_<i>", mmseg's log prefix for head i."""

    def forward(self, inputs):
        return {f"aux_{i}": head(inputs) for i, head in enumerate(self)}


class Segmentor(nn.Module):
    """Backbone + decode head (+ auxiliary head) (+ HL head); attribute names follow mmseg's EncoderDecoder.

    Args:
        auxiliary_head: one head (output "aux") or AuxiliaryHeads (outputs "aux_<i>").
        hl_head: the HL branch D, a copy of the decode head with one output channel (authors' hl_encoder_decoder.py).
        detach_hl_features: feed the HL head detached features, so no HL gradient reaches the backbone.
    """

    def __init__(self, backbone, decode_head, auxiliary_head=None, hl_head=None, align_corners=False,
                 detach_hl_features=True):
        super().__init__()
        self.backbone, self.decode_head = backbone, decode_head
        self.auxiliary_head, self.hl_head = auxiliary_head, hl_head
        self.align_corners, self.detach_hl_features = align_corners, detach_hl_features
        self.num_classes = decode_head.num_classes

    def forward(self, img, feature_perturbation=False):
        """Logits at decoder resolution: {"out"} in eval mode; plus "aux" (or "aux_<i>") and "hl" (raw D) when
        training, and the decode head's own extras (U2PL's "rep", see DecodeHead.outputs).

        Args:
            feature_perturbation: also return "out_fp", the decode head's logits on Dropout2d(0.5)-perturbed
                features, computed in the same pass as "out" (UniMatch's FP; head type aspp_plus). The HL head still
                sees the clean features.
        """
        feats = self.backbone(img)
        out = self._decode_outputs(feats, feature_perturbation)
        if not self.training:
            return out
        if self.auxiliary_head is not None:
            aux = self.auxiliary_head(feats)
            out.update(aux if isinstance(aux, dict) else {"aux": aux})
        if self.hl_head is not None:
            hl_feats = tuple(f.detach() for f in feats) if self.detach_hl_features else feats
            out["hl"] = self.hl_head(hl_feats)
        return out

    def _decode_outputs(self, feats, feature_perturbation):
        return self.decode_head.outputs(feats, feature_perturbation)

    def _decode(self, img):
        """mmseg encode_decode: decode-head logits resized to the input size."""
        return resize(self.decode_head(self.backbone(img)), img.shape[2:], self.align_corners)

    @torch.no_grad()
    def predict(self, img, mode="whole", crop=None, stride=None, window_batch=8):
        """N×C×H×W decode logits at input size; the HL branch is never used (authors' hl_encoder_decoder.py).

        Args:
            mode: "whole" (one pass) or "slide" (windows of `crop` every `stride`, both (h, w) or int).
            window_batch: windows run together in one forward pass.
        """
        if mode == "whole":
            return self._decode(img)
        if mode not in PREDICT_MODES:
            raise ValueError(f"predict mode must be one of {', '.join(PREDICT_MODES)}, got {mode!r}")
        if crop is None or stride is None:
            raise ValueError(f"{mode} inference needs crop=(h, w) and stride=(h, w)")
        if mode == "slide_truncated":
            return self._slide_truncated(img, _pair(crop), _pair(stride))
        return self._slide(img, _pair(crop), _pair(stride), window_batch)

    def _slide_truncated(self, img, crop, stride):
        """UniMatch's sliding window: windows start at 0 every `stride` and are cut at the border (not shifted
        inside), their softmax probabilities are summed; returns the log of the mean probability."""
        n, _, h, w = img.shape
        (ch, cw), (sh, sw) = crop, stride
        prob = img.new_zeros(n, self.num_classes, h, w)
        count = img.new_zeros(1, 1, h, w)
        for y0 in range(0, h, sh):
            for x0 in range(0, w, sw):
                window = img[:, :, y0:y0 + ch, x0:x0 + cw]
                prob[:, :, y0:y0 + ch, x0:x0 + cw] += self._decode(window).softmax(1)
                count[:, :, y0:y0 + ch, x0:x0 + cw] += 1
        return (prob / count).clamp_min(1e-12).log()

    def _slide(self, img, crop, stride, window_batch):
        n, _, h, w = img.shape
        (ch, cw), (sh, sw) = crop, stride
        # Pad images smaller than the window (normalised pad value 0, as in training) so that all windows share one
        # size and can be batched; the padding is cropped off again below.
        x = F.pad(img, (0, max(cw - w, 0), 0, max(ch - h, 0)))
        height, width = x.shape[2:]
        windows = [(y0, x0) for y0 in window_starts(height, ch, sh) for x0 in window_starts(width, cw, sw)]
        logits = img.new_zeros(n, self.num_classes, height, width)
        count = img.new_zeros(1, 1, height, width)
        for i in range(0, len(windows), window_batch):
            chunk = windows[i:i + window_batch]
            crops = torch.cat([x[:, :, y0:y0 + ch, x0:x0 + cw] for y0, x0 in chunk])
            for (y0, x0), out in zip(chunk, self._decode(crops).split(n)):
                logits[:, :, y0:y0 + ch, x0:x0 + cw] += out
                count[:, :, y0:y0 + ch, x0:x0 + cw] += 1
        return (logits / count)[:, :, :h, :w]

    @torch.no_grad()
    def predict_hl(self, img):
        """N×1×H×W raw HL logits D at input size, for HL maps (any mode)."""
        if self.hl_head is None:
            raise ValueError("this model has no HL head; build it with hl.enabled=true")
        return resize(self.hl_head(self.backbone(img)), img.shape[2:], self.align_corners)


class CascadeSegmentor(Segmentor):
    """mmseg CascadeEncoderDecoder (OCRNet): decode_head and hl_head are CascadeHeads.

    forward adds "out0", the stage-0 logits (trained by their own loss); "out" and predict use the last stage.
    The HL branch copies both stages (authors' hl_cascade_encoder_decoder.py): its stage-0 copy keeps
    num_classes outputs and feeds the one-output stage-1 copy, so calling hl_head yields D directly.
    """

    def _decode_outputs(self, feats, feature_perturbation):
        if feature_perturbation:
            raise ConfigError("the OCRNet cascade has no feature perturbation; UniMatch's needs head type aspp_plus")
        stage0, out = self.decode_head.stages(feats)
        return {"out": out, "out0": stage0}
