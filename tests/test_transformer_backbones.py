"""ConvNeXt, Swin and MiT backbones and the SegFormer head: mmseg / mmpretrain key names and widths, Swin's window
padding and shift order, stochastic depth, ImageNet-file loading, and the tiny model configs trained with HL.
Logit parity with mmseg itself is analysis/mmseg_parity.py's."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from hlbench.compose import compose
from hlbench.errors import BadFileError, ConfigError
from hlbench.models import build_model, load_pretrained
from hlbench.models.build import BACKBONES, HEADS
from hlbench.models.convnext import ConvNeXt
from hlbench.models.mit import MixVisionTransformer
from hlbench.models.segformer_head import SegformerHead
from hlbench.models.swin import PatchMerging, ShiftWindowMSA, SwinTransformer, relative_position_index, shift_mask
from hlbench.models.transformer_parts import DropPath, drop_path_rates

MODEL_DIR = Path(__file__).resolve().parents[1] / "hlbench" / "conf" / "model"
FULL = ("upernet_convnext_b", "upernet_swin_b", "segformer_mit_b0", "segformer_mit_b3", "segformer_mit_b5")
TINY = ("tiny/upernet_convnext", "tiny/upernet_swin", "tiny/segformer")


def _meta(cls, **kwargs):
    with torch.device("meta"):
        return cls(**kwargs)


def test_convnext_b_keys_and_shapes_are_mmpretrains():
    net = _meta(ConvNeXt)
    sd = net.state_dict()
    # 36 blocks x 9 tensors, stem 4, three downsamples 4 each, four output norms 2 each.
    assert len(sd) == 36 * 9 + 4 + 12 + 8 and net.out_channels == [128, 256, 512, 1024]
    assert sd["downsample_layers.0.0.weight"].shape == (128, 3, 4, 4)  # stem: conv, then LayerNorm
    assert sd["downsample_layers.0.1.weight"].shape == (128,) and sd["downsample_layers.3.0.bias"].shape == (512,)
    assert sd["downsample_layers.3.1.weight"].shape == (1024, 512, 2, 2)  # downsamples: LayerNorm, then conv
    assert sd["stages.0.0.depthwise_conv.weight"].shape == (128, 1, 7, 7)
    assert sd["stages.2.26.pointwise_conv1.weight"].shape == (2048, 512) and sd["stages.2.26.gamma"].shape == (512,)
    assert {f"norm{i}.weight" for i in range(4)} <= set(sd) and "stages.3.3.gamma" not in sd
    assert all(m.eps == 1e-6 for m in net.modules() if isinstance(m, torch.nn.LayerNorm))


def test_swin_b_keys_and_shapes_are_mmsegs():
    net = _meta(SwinTransformer)
    sd = net.state_dict()
    # 24 blocks x 14 tensors (the relative position index is a saved buffer), patch embed 4, three PatchMergings
    # 3 each, four output norms 2 each.
    assert len(sd) == 24 * 14 + 4 + 9 + 8 and net.out_channels == [128, 256, 512, 1024]
    assert sd["patch_embed.projection.weight"].shape == (128, 3, 4, 4) and "patch_embed.norm.bias" in sd
    block = "stages.2.blocks.17."
    assert sd[block + "attn.w_msa.relative_position_bias_table"].shape == (23 * 23, 16)
    assert sd[block + "attn.w_msa.relative_position_index"].shape == (144, 144)
    assert sd[block + "attn.w_msa.qkv.weight"].shape == (1536, 512) and block + "attn.w_msa.proj.bias" in sd
    assert sd[block + "ffn.layers.0.0.weight"].shape == (2048, 512)
    assert sd[block + "ffn.layers.1.weight"].shape == (512, 2048)
    assert sd["stages.2.downsample.norm.weight"].shape == (2048,)
    assert sd["stages.2.downsample.reduction.weight"].shape == (1024, 2048)
    assert "stages.2.downsample.reduction.bias" not in sd and not any(k.startswith("stages.3.downsample") for k in sd)
    assert [net.stages[0].blocks[i].attn.shift for i in range(2)] == [0, 6]


def test_mit_b0_keys_shapes_and_eps_are_mmsegs():
    net = _meta(MixVisionTransformer, embed_dims=32, num_layers=(2, 2, 2, 2))
    sd = net.state_dict()
    # Blocks with a spatial reduction hold 18 tensors, those of the last stage (ratio 1) 14; four patch embeds
    # and four stage norms.
    assert len(sd) == 6 * 18 + 2 * 14 + 16 + 8 and net.out_channels == [32, 64, 160, 256]
    assert sd["layers.0.0.projection.weight"].shape == (32, 3, 7, 7)
    assert sd["layers.1.0.projection.weight"].shape == (64, 32, 3, 3)
    assert sd["layers.1.1.0.attn.attn.in_proj_weight"].shape == (192, 64)  # q, k and v packed
    assert "layers.1.1.0.attn.attn.in_proj_bias" in sd
    assert sd["layers.1.1.0.attn.attn.out_proj.weight"].shape == (64, 64)
    assert sd["layers.0.1.1.attn.sr.weight"].shape == (32, 32, 8, 8) and "layers.0.1.1.attn.norm.weight" in sd
    assert "layers.3.1.0.attn.sr.weight" not in sd
    assert [k.split("ffn.layers.")[1] for k in sd if k.startswith("layers.3.1.0.ffn.")] == \
        ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"]
    assert sd["layers.3.1.0.ffn.layers.1.weight"].shape == (1024, 1, 3, 3) and sd["layers.2.2.weight"].shape == (160,)
    assert all(m.eps == 1e-6 for m in net.modules() if isinstance(m, torch.nn.LayerNorm))


def test_segformer_head_keys_and_bad_in_index():
    head = SegformerHead([8, 16, 40, 64], 32, 5)
    assert {k for k in head.state_dict() if k.startswith("fusion_conv.")} >= {"fusion_conv.conv.weight",
                                                                              "fusion_conv.bn.running_var"}
    assert head.convs[3].conv.weight.shape == (32, 64, 1, 1) and head.fusion_conv.conv.weight.shape == (32, 128, 1, 1)
    feats = [torch.randn(1, c, s, s) for c, s in zip([8, 16, 40, 64], [9, 5, 3, 2])]
    assert head.eval()(feats).shape == (1, 5, 9, 9)
    with pytest.raises(ConfigError, match="in_index"):
        SegformerHead(64, 32, 5, in_index=3)


def test_registered_under_their_config_names():
    assert (BACKBONES["convnext"], BACKBONES["swin"], BACKBONES["mit"], HEADS["segformer"]) == \
        (ConvNeXt, SwinTransformer, MixVisionTransformer, SegformerHead)


def test_relative_position_index_by_hand():
    # Positions (0,0), (0,1), (1,0), (1,1) of a 2x2 window: (Δrow + 1) * 3 + Δcol + 1.
    assert relative_position_index(2).tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]


def test_shift_mask_separates_the_regions_of_the_last_windows():
    mask = shift_mask(8, 8, 4, 2, "cpu")  # four windows; after the shift the right/bottom ones hold 2-4 regions
    assert mask.shape == (4, 16, 16) and set(mask.unique().tolist()) == {0.0, -100.0}
    blocked = (mask < 0).sum(dim=(1, 2)).tolist()
    # Two regions of 8 tokens block 2 * 8 * 8 pairs; four regions of 4 tokens block 16 * 16 - 4 * 4 * 4.
    assert blocked == [0, 128, 128, 192]


def test_swin_pads_to_the_window_before_the_cyclic_shift():
    # Padding first (mmseg, official Swin-Seg) means a 7x7 grid is attended exactly as its zero-padded 8x8 grid:
    # the shift wraps the padded rows around. Rolling first (timm) wraps the 7x7 grid and differs.
    torch.manual_seed(0)
    attn = ShiftWindowMSA(8, 2, window=4, shift=2, drop_prob=0.0).eval()
    x = torch.randn(1, 8, 7, 7)
    padded = F.pad(x, (0, 1, 0, 1))
    tokens = x.flatten(2).transpose(1, 2)
    out = attn(tokens, (7, 7)).transpose(1, 2).reshape(1, 8, 7, 7)
    out_padded = attn(padded.flatten(2).transpose(1, 2), (8, 8)).transpose(1, 2).reshape(1, 8, 8, 8)
    torch.testing.assert_close(out, out_padded[:, :, :7, :7])


def test_patch_merging_gathers_channel_major_as_unfold():
    merging = PatchMerging(2)
    captured = []
    merging.norm.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    # Token (row r, column c) of a 2x2 grid holds 10 * channel + 2 * r + c.
    tokens = torch.tensor([[[2 * r + c + 10 * k for k in range(2)] for r in range(2) for c in range(2)]],
                          dtype=torch.float)
    merging(tokens, (2, 2))
    assert captured[0].tolist() == [[[0, 1, 2, 3, 10, 11, 12, 13]]]


@pytest.mark.parametrize("size, stages", [(64, [16, 8, 4, 2]), (70, [18, 9, 5, 3]), (97, [25, 13, 7, 4])])
def test_swin_output_sizes_with_padded_patches_windows_and_merges(size, stages):
    net = SwinTransformer(embed_dims=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=3).eval()
    feats = net(torch.randn(1, 3, size, size + 3))
    assert [tuple(f.shape[1:3]) for f in feats] == [(c, s) for c, s in zip([8, 16, 32, 64], stages)]
    assert feats[0].shape[3] == -(-(size + 3) // 4)


def test_drop_path_rates_rise_linearly_over_all_blocks():
    assert [r for (r,) in drop_path_rates(0.3, (1, 1, 1, 1))] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    rates = drop_path_rates(0.4, (3, 3, 27, 3))
    assert [len(r) for r in rates] == [3, 3, 27, 3] and rates[0][0] == 0 and rates[3][-1] == pytest.approx(0.4)
    net = _meta(MixVisionTransformer, embed_dims=8, num_layers=(2, 2, 2, 2), drop_path_rate=0.7)
    assert net.layers[3][1][1].ffn.dropout_layer.drop_prob == pytest.approx(0.7)
    with pytest.raises(ConfigError, match="drop_path_rate"):
        drop_path_rates(1.0, (2, 2))


def test_drop_path_is_off_in_eval_and_seeded_in_training():
    drop = DropPath(0.5)
    x = torch.randn(64, 3, 4)
    assert drop.eval()(x) is x
    drop.train()
    torch.manual_seed(3)
    first = drop(x)
    torch.manual_seed(3)
    assert torch.equal(first, drop(x))
    kept = first.flatten(1).any(dim=1)
    assert 0 < kept.sum() < 64  # whole samples are dropped, the kept ones scaled by 1 / (1 - p)
    torch.testing.assert_close(first[kept], 2 * x[kept])


def test_a_model_in_eval_mode_is_deterministic():
    net = ConvNeXt(depths=(1, 1, 1, 1), channels=(8, 8, 8, 8), drop_path_rate=0.9)
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    assert all(torch.equal(a, b) for a, b in zip(net(x), net(x)))
    net.train()
    assert not all(torch.equal(a, b) for a, b in zip(net(x), net(x)))


@pytest.mark.parametrize("cls, kwargs, key", [
    (ConvNeXt, {"depths": (1, 1, 1), "channels": (8, 8, 8, 8)}, "channels"),
    (ConvNeXt, {"layer_scale_init_value": 0}, "layer_scale_init_value"),
    (SwinTransformer, {"num_heads": (1, 2, 4)}, "num_heads"),
    (SwinTransformer, {"embed_dims": 10, "num_heads": (3, 6, 12, 24)}, "num_heads"),
    (SwinTransformer, {"window_size": 1}, "window_size"),
    (MixVisionTransformer, {"sr_ratios": (8, 4, 2)}, "sr_ratios"),
])
def test_bad_backbone_arguments_name_the_key(cls, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        _meta(cls, **kwargs)


def _tiny_backbone(cls):
    return {ConvNeXt: lambda: ConvNeXt(depths=(1, 1, 1, 1), channels=(8, 16, 32, 64)),
            SwinTransformer: lambda: SwinTransformer(embed_dims=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                                                     window_size=4),
            MixVisionTransformer: lambda: MixVisionTransformer(embed_dims=8, num_layers=(1, 1, 1, 1))}[cls]()


@pytest.mark.parametrize("cls, extra, missing", [
    # mmcls' classifier file: keys under `backbone.`, its final norm as norm3, a `head.fc` classifier.
    (ConvNeXt, {"head.fc.weight": torch.zeros(10, 64), "head.fc.bias": torch.zeros(10)}, ["norm0", "norm1", "norm2"]),
    # mmseg's converted Swin file: the classifier's `norm` and `head` are not the output norms norm0-3.
    (SwinTransformer, {"norm.weight": torch.zeros(64), "head.weight": torch.zeros(10, 64)},
     ["norm0", "norm1", "norm2", "norm3"]),
    (MixVisionTransformer, {"head.weight": torch.zeros(10, 64)}, []),
])
def test_imagenet_files_load_with_a_key_report(tmp_path, cls, extra, missing):
    source = _tiny_backbone(cls)
    state = {k: v for k, v in source.state_dict().items() if k.split(".")[0] not in missing}
    if cls is ConvNeXt:
        state = {f"backbone.{k}": v for k, v in state.items()}
    torch.save({"state_dict": {**state, **extra}, "meta": {}}, tmp_path / "imagenet.pth")
    net = _tiny_backbone(cls)
    report = load_pretrained(net, tmp_path / "imagenet.pth")
    assert sorted({k.split(".")[0] for k in report["missing"]}) == missing
    assert sorted(report["unexpected"]) == sorted(extra)
    first = next(k for k in net.state_dict() if "weight" in k)
    assert torch.equal(net.state_dict()[first], source.state_dict()[first])


def test_a_file_of_another_window_is_a_one_line_error(tmp_path):
    torch.save(_tiny_backbone(SwinTransformer).state_dict(), tmp_path / "window4.pth")
    net = SwinTransformer(embed_dims=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=3)
    with pytest.raises(BadFileError, match="relative_position_bias_table"):
        load_pretrained(net, tmp_path / "window4.pth")


@pytest.mark.parametrize("name", FULL)
def test_full_configs_build_with_the_authors_widths_and_name_their_smoke_model(name):
    cfg = OmegaConf.load(MODEL_DIR / f"{name}.yaml")
    tiny = OmegaConf.load(MODEL_DIR / f"{cfg.smoke}.yaml")
    assert tiny.backbone.type == cfg.backbone.type and tiny.head.type == cfg.head.type
    assert bool(tiny.aux.enabled) == bool(cfg.aux.enabled) and tiny.backbone.pretrained == "none"
    cfg.backbone.pretrained = "none"
    with torch.device("meta"):
        model = build_model(cfg, 150, hl={"enabled": True})
    widths = {"upernet_convnext_b": [128, 256, 512, 1024], "upernet_swin_b": [128, 256, 512, 1024],
              "segformer_mit_b0": [32, 64, 160, 256]}.get(name, [64, 128, 320, 512])
    assert model.backbone.out_channels == widths and model.hl_head.num_classes == 1
    assert type(model.hl_head) is type(model.decode_head)


@pytest.mark.parametrize("name, head_channels", [*((n, None) for n in TINY), ("tiny/segformer", 8)])
def test_tiny_configs_train_with_hl_at_odd_sizes(hydra_ctx, name, head_channels):
    cfg = compose([f"model={name}", "data=synthetic", "hl.enabled=true",
                                       f"hl.head_channels={head_channels or 'null'}"])
    model = build_model(cfg.model, num_classes=3, hl=cfg.hl).train()
    torch.manual_seed(0)
    out = model(torch.randn(2, 3, 70, 96))  # 70: not a multiple of the patch (4), the window (4) or the stride 32
    # ConvNeXt's stem conv drops the rest of a 4-pixel patch; Swin pads it, MiT's overlapping patches cover it.
    rows = 17 if cfg.model.backbone.type == "convnext" else 18
    assert out["out"].shape[2:] == (rows, 24) and out["hl"].shape[1:] == (1, rows, 24)
    (out["out"].mean() + out["hl"].mean() + out.get("aux", out["out"]).mean()).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.hl_head.parameters())
    assert model.eval().predict(torch.randn(1, 3, 97, 97)).shape == (1, 3, 97, 97)
