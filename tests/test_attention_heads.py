"""The attention heads of the Cityscapes architecture table: PSANet's mask against mmcv's kernel, criss-cross
attention against its definition, the zero inits, EMANet's bases, mmseg key names, HL copies."""
import pytest
import torch

from hlbench.compose import compose
from hlbench.models import build_model
from hlbench.models.attention_heads import (ANNHead, CCHead, CrissCrossAttention, EMAHead, GCHead, ISAHead, NLHead,
                                            PSAHead, psa_mask)

CHANNELS = [16, 32, 64, 128]


def _features(size=(8, 8), batch=2):
    """An OS8 backbone tuple (stage 0 at twice the size)."""
    h, w = size
    return tuple(torch.randn(batch, c, h * (2 if i == 0 else 1), w * (2 if i == 0 else 1))
                 for i, c in enumerate(CHANNELS))


HEADS = {
    "ann": lambda n: ANNHead([64, 128], 16, n, project_channels=8, key_pool_scales=(1, 3), in_index=[2, 3]),
    "cc": lambda n: CCHead(128, 16, n),
    "ema": lambda n: EMAHead(128, 16, n, ema_channels=24, num_bases=4),
    "gc": lambda n: GCHead(128, 16, n),
    "isa": lambda n: ISAHead(128, 16, n, isa_channels=8, down_factor=(4, 4)),
    "nl": lambda n: NLHead(128, 16, n),
    "psa": lambda n: PSAHead(128, 16, n, mask_size=(9, 9)),
}


def _psa_mask_loop(x, mask_size, mode):
    """mmcv csrc/pytorch/cpu/psamask.cpp (psamask_{collect,distribute}_forward), loop for loop."""
    n, _, h, w = x.shape
    mh, mw = mask_size
    half_h, half_w = (mh - 1) // 2, (mw - 1) // 2
    out = torch.zeros(n, h * w, h, w)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                for hidx in range(max(0, half_h - i), min(mh, h + half_h - i)):
                    for widx in range(max(0, half_w - j), min(mw, w + half_w - j)):
                        p = (hidx + i - half_h) * w + (widx + j - half_w)
                        value = x[b, hidx * mw + widx, i, j]
                        if mode == "collect":
                            out[b, p, i, j] = value
                        else:
                            out[b, i * w + j, p // w, p % w] = value
    return out


@pytest.mark.parametrize("mode", ["collect", "distribute"])
@pytest.mark.parametrize("size, mask_size", [((3, 4), (3, 5)), ((5, 3), (9, 5)), ((4, 4), (1, 3))])
def test_psa_mask_matches_mmcv_kernel(mode, size, mask_size):
    x = torch.randn(2, mask_size[0] * mask_size[1], *size, requires_grad=True)
    out = psa_mask(x, mask_size, mode)
    loop = _psa_mask_loop(x, mask_size, mode)
    assert torch.equal(out, loop)
    # The kernel's backward hands each input entry the gradient of the output it was copied to: the loop's own
    # autograd does exactly that.
    grad_out = torch.randn_like(out)
    expected, = torch.autograd.grad(loop, x, grad_out)
    out.backward(grad_out)
    assert torch.equal(x.grad, expected) and expected.any()


def test_psa_mask_by_hand():
    # 2×2 map, 3×3 mask centred on each position: at q = (0, 0), positions (0,0), (0,1), (1,0), (1,1) sit at mask
    # offsets (1,1), (1,2), (2,1), (2,2), i.e. mask entries 4, 5, 7, 8.
    x = torch.arange(9.0).reshape(1, 9, 1, 1).expand(1, 9, 2, 2).contiguous()
    collect = psa_mask(x, (3, 3), "collect")
    assert collect[0, :, 0, 0].tolist() == [4, 5, 7, 8]
    assert collect[0, :, 1, 1].tolist() == [0, 1, 3, 4]  # seen from (1, 1), (0, 0) is one up and left
    assert torch.equal(psa_mask(x, (3, 3), "distribute").reshape(4, 4), collect.reshape(4, 4).T)


def test_criss_cross_attention_counts_each_position_once():
    torch.manual_seed(0)
    cca = CrissCrossAttention(16)
    torch.nn.init.ones_(cca.gamma.scale)
    x = torch.randn(1, 16, 3, 4)
    q, k, v = cca.query_conv(x)[0], cca.key_conv(x)[0], cca.value_conv(x)[0]
    expected = torch.empty(16, 3, 4)
    for i in range(3):
        for j in range(4):
            # its column without itself, then its row with itself: each position once
            others = [(r, j) for r in range(3) if r != i] + [(i, c) for c in range(4)]
            weights = torch.stack([q[:, i, j] @ k[:, r, c] for r, c in others]).softmax(0)
            expected[:, i, j] = sum(wt * v[:, r, c] for wt, (r, c) in zip(weights, others))
    assert torch.allclose(cca(x)[0], x[0] + expected, atol=1e-5)


@pytest.mark.parametrize("name, block", [("cc", "cca"), ("nl", "nl_block"), ("gc", "gc_block")])
def test_context_blocks_start_as_identity(name, block):
    head = HEADS[name](5).eval()
    x = torch.randn(2, 16, 5, 7)
    assert torch.equal(getattr(head, block)(x), x)


def test_zero_inits():
    assert HEADS["cc"](5).cca.gamma.scale.item() == 0
    nl = HEADS["nl"](5).nl_block
    assert not nl.conv_out.bn.weight.any() and not nl.conv_out.bn.bias.any()
    assert 0.005 < nl.theta.conv.weight.std() < 0.02
    last = HEADS["gc"](5).gc_block.channel_add_conv[-1]
    assert not last.weight.any() and not last.bias.any()
    for block in (HEADS["ann"](5).fusion, HEADS["ann"](5).context):
        out = block.stages[0].out_project
        assert not out.weight.any() and not out.bias.any()


@pytest.mark.parametrize("name, keys", [
    ("ann", ["fusion.stages.0.key_project.conv.weight", "fusion.stages.0.query_project.bn.running_var",
             "fusion.stages.0.value_project.weight", "fusion.stages.0.out_project.bias", "fusion.bottleneck.bn.weight",
             "bottleneck.conv.weight", "context.stages.0.key_project.conv.weight",
             "context.stages.0.query_project.conv.weight", "context.bottleneck.conv.weight"]),
    ("cc", ["convs.0.conv.weight", "convs.1.bn.bias", "cca.query_conv.weight", "cca.key_conv.bias",
            "cca.value_conv.weight", "cca.gamma.scale", "conv_cat.conv.weight"]),
    ("ema", ["ema_in_conv.conv.weight", "ema_mid_conv.conv.weight", "ema_mid_conv.conv.bias", "ema_module.bases",
             "ema_out_conv.bn.running_mean", "bottleneck.conv.weight", "conv_cat.bn.weight"]),
    ("gc", ["gc_block.conv_mask.weight", "gc_block.channel_add_conv.0.weight", "gc_block.channel_add_conv.1.weight",
            "gc_block.channel_add_conv.3.bias", "convs.1.conv.weight", "conv_cat.conv.weight"]),
    ("isa", ["in_conv.conv.weight", "global_relation.key_project.1.conv.weight",
             "global_relation.query_project.0.bn.weight", "global_relation.value_project.bias",
             "local_relation.output_project.conv.weight", "out_conv.bn.running_var"]),
    ("nl", ["nl_block.g.conv.weight", "nl_block.theta.conv.bias", "nl_block.phi.conv.weight",
            "nl_block.conv_out.conv.weight", "nl_block.conv_out.bn.weight", "conv_cat.conv.weight"]),
    ("psa", ["reduce.conv.weight", "reduce_p.bn.weight", "attention.0.conv.weight", "attention.1.weight",
             "attention_p.1.weight", "proj.conv.weight", "bottleneck.conv.weight"]),
])
def test_key_names_match_mmseg(name, keys):
    state = HEADS[name](5).state_dict()
    assert all(k in state for k in keys), [k for k in keys if k not in state]
    assert not any("key_pool" in k or k.startswith("dropout") for k in state)  # parameter-free, as in mmseg


def test_layer_shapes_follow_mmseg():
    ann = HEADS["ann"](5)
    assert ann.fusion.bottleneck.conv.in_channels == 2 * 128 and ann.bottleneck.conv.kernel_size == (3, 3)
    assert ann.context.stages[0].query_project is ann.context.stages[0].key_project  # APNB shares them
    assert ann.fusion.stages[0].query_project is not ann.fusion.stages[0].key_project
    psa = HEADS["psa"](5)
    assert psa.attention[1].out_channels == 81 and psa.proj.conv.padding == (1, 1)
    assert psa.proj.conv.in_channels == 32 and psa.bottleneck.conv.in_channels == 256
    cc = HEADS["cc"](5)
    assert cc.cca.query_conv.out_channels == 2 and cc.conv_cat.conv.in_channels == 128 + 16
    assert HEADS["nl"](5).nl_block.g.conv.out_channels == 8
    assert HEADS["gc"](5).gc_block.channel_add_conv[0].out_channels == 4


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("size", [(8, 8), (7, 5)])  # odd sides: ISANet's padding, PSANet's corner-aligned shrink
def test_output_shape(name, size):
    head = HEADS[name](5)
    feats = _features(size)
    assert head(feats).shape == (2, 5, *size)
    head.eval()
    assert head(_features(size, batch=1)).shape == (1, 5, *size)


def test_ema_bases_update_only_in_training():
    torch.manual_seed(0)
    head = HEADS["ema"](5)
    module = head.ema_module
    assert torch.allclose(module.bases.norm(dim=1), torch.ones(1, 4))
    assert not any(p.requires_grad for p in head.ema_mid_conv.parameters())
    before = module.bases.clone()
    head.eval()(_features())
    assert torch.equal(module.bases, before)
    module.momentum = 1.0  # the update then is the batch's bases: L2-normalised, different from the start
    head.train()(_features())
    assert torch.allclose(module.bases.norm(dim=1), torch.ones(1, 4)) and not torch.allclose(module.bases, before)
    moved = module.bases.clone()
    module.momentum = 0.0
    head(_features())
    assert torch.equal(module.bases, moved)


def test_ema_reconstruction_passes_no_gradient():
    # As mmseg's: the EM iterations run without gradient, so only the residual path trains ema_in_conv.
    feats = torch.randn(2, 24, 4, 4, requires_grad=True)
    assert not HEADS["ema"](5).train().ema_module(feats).requires_grad


SMALL = ["model.backbone.pretrained=none", "model.backbone.depth=18", "model.backbone.width_mult=0.25",
         "model.head.channels=16"]
MODELS = ["ann_r101", "ccnet_r101", "emanet_r101", "gcnet_r101", "isanet_r101", "nonlocal_r101", "psanet_r101"]


@pytest.mark.parametrize("name", MODELS)
def test_model_config_builds_with_its_hl_copy(hydra_ctx, name):
    cfg = compose([f"model={name}", *SMALL, "hl.enabled=true"])
    model = build_model(cfg.model, num_classes=3, hl=cfg.hl).train()
    assert type(model.hl_head) is type(model.decode_head) and model.hl_head.num_classes == 1
    assert model.auxiliary_head.convs[0].conv.in_channels == model.backbone.out_channels[2]
    out = model(torch.randn(2, 3, 65, 65))
    assert out["hl"].shape == (2, 1, 9, 9) and out["out"].shape == out["aux"].shape == (2, 3, 9, 9)


def test_hl_copies_keep_zero_inits_and_own_bases(hydra_ctx):
    def build(name):
        cfg = compose([f"model={name}", *SMALL, "hl.enabled=true"])
        return build_model(cfg.model, num_classes=3, hl=cfg.hl)

    assert build("ccnet_r101").hl_head.cca.gamma.scale.item() == 0
    assert not build("nonlocal_r101").hl_head.nl_block.conv_out.bn.weight.any()
    assert not build("gcnet_r101").hl_head.gc_block.channel_add_conv[-1].weight.any()
    model = build("emanet_r101").train()
    hl_bases, decode_bases = model.hl_head.ema_module.bases.clone(), model.decode_head.ema_module.bases.clone()
    assert not torch.equal(hl_bases, decode_bases)
    model(torch.randn(2, 3, 33, 33))
    assert not torch.equal(model.hl_head.ema_module.bases, hl_bases)  # the HL forward updates the copy's own
    assert not torch.equal(model.decode_head.ema_module.bases, decode_bases)


@pytest.mark.parametrize("name, read", [("ann_r101", {2, 3}), ("psanet_r101", {3}), ("emanet_r101", {3})])
def test_light_hl_head(hydra_ctx, name, read):
    cfg = compose([f"model={name}", *SMALL, "hl.enabled=true", "hl.head_channels=4"])
    model = build_model(cfg.model, num_classes=3, hl=cfg.hl).train()
    assert {i for i, p in enumerate(model.hl_head.project) if not isinstance(p, torch.nn.Identity)} == read
    assert model.hl_head.channels == 4
    assert model(torch.randn(2, 3, 65, 65))["hl"].shape == (2, 1, 9, 9)
