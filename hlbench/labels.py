"""Label conventions shared by the data sets, losses, metrics and drawings."""

# mmseg's ignore label: void classes, and the crop padding (its Pad uses seg_pad_val=255).
IGNORE_INDEX = 255
