"""Explanations on real (small) models: Attention Rollout, attention capture, Grad-CAM, deletion curves, TTA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ipmn.augment import cellwise, random_cell_transform, tta_transforms
from ipmn.errors import IPMNError
from ipmn.explain import (
    AttentionCapture,
    attention_rollout,
    deletion_curve,
    explain,
    minmax_normalize,
)
from ipmn.models import GRADCAM_TARGET_LAYERS, build_model

TINY = dict(arch="vit_tiny_patch16_224", depth=2, embed_dim=48, num_heads=3)


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return build_model(TINY).eval()


@pytest.fixture(scope="module")
def grid_batch():
    torch.manual_seed(1)
    return torch.rand(2, 2, 192, 192)


# --------------------------------------------------------------------------------------------------
# Attention Rollout
# --------------------------------------------------------------------------------------------------


def reference_rollout(attentions, head_fusion="mean"):
    """Straightforward rollout with explicit loops over samples, layers, heads and rows (float64)."""
    b_size, _, n, _ = attentions[0].shape
    out = torch.zeros(b_size, n - 1, dtype=torch.float64)
    for b in range(b_size):
        rollout = torch.eye(n, dtype=torch.float64)
        for attn in attentions:  # layer 1 first: R = A_L ... A_1
            heads = attn.shape[1]
            fused = attn[b, 0].double().clone()
            for h in range(1, heads):
                a = attn[b, h].double()
                if head_fusion == "mean":
                    fused = fused + a
                elif head_fusion == "max":
                    fused = torch.maximum(fused, a)
                else:
                    fused = torch.minimum(fused, a)
            if head_fusion == "mean":
                fused = fused / heads
            a = fused + torch.eye(n, dtype=torch.float64)
            for i in range(n):
                a[i] = a[i] / a[i].sum()
            rollout = a @ rollout
        out[b] = rollout[0, 1:]
    return out


def test_capture_rows_sum_to_one_and_logits_match_fused(tiny_vit, grid_batch):
    for blk in tiny_vit.blocks:
        blk.attn.fused_attn = True  # compare against timm's fused SDPA path explicitly
    with torch.no_grad():
        fused_logits = tiny_vit(grid_batch)
        with AttentionCapture(tiny_vit) as cap:
            assert not any(blk.attn.fused_attn for blk in tiny_vit.blocks)
            logits = tiny_vit(grid_batch)
    attns = cap.attentions
    assert len(attns) == 2
    for a in attns:
        assert a.shape == (2, 3, 145, 145)
        assert torch.allclose(a.sum(-1), torch.ones(2, 3, 145), atol=1e-5)
    assert torch.allclose(logits, fused_logits, atol=1e-5)
    # hooks removed, fused flags restored
    assert all(blk.attn.fused_attn for blk in tiny_vit.blocks)
    assert all(len(blk.attn.attn_drop._forward_hooks) == 0 for blk in tiny_vit.blocks)


def test_capture_without_forward_raises(tiny_vit):
    with AttentionCapture(tiny_vit) as cap:
        pass
    with pytest.raises(RuntimeError):
        cap.attentions  # noqa: B018


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_rollout_matches_loop_reference(tiny_vit, grid_batch, head_fusion):
    with torch.no_grad(), AttentionCapture(tiny_vit) as cap:
        tiny_vit(grid_batch)
    got = attention_rollout(cap.attentions, head_fusion=head_fusion)
    want = reference_rollout(cap.attentions, head_fusion)
    assert got.shape == (2, 144)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_rollout_discard_keeps_class_token_column():
    torch.manual_seed(0)
    attns = [torch.softmax(torch.randn(1, 2, 5, 5), -1) for _ in range(2)]
    full = attention_rollout(attns, discard_ratio=0.0)
    dropped = attention_rollout(attns, discard_ratio=0.5)
    assert not torch.allclose(full, dropped)
    # discard only affects attention to patches: with one layer, the class row is computable by hand
    fused = attns[0].mean(1)[0]
    to_patches = fused[:, 1:].flatten()
    keep = to_patches >= to_patches.sort().values[int(to_patches.numel() * 0.5)]
    fused2 = torch.cat([fused[:, :1], (to_patches * keep).reshape(5, 4)], 1) + torch.eye(5)
    fused2 = fused2 / fused2.sum(-1, keepdim=True)
    assert torch.allclose(attention_rollout(attns[:1], discard_ratio=0.5)[0], fused2[0, 1:], atol=1e-6)
    with pytest.raises(IPMNError, match="discard_ratio"):
        attention_rollout(attns, discard_ratio=1.0)
    with pytest.raises(IPMNError, match="head_fusion"):
        attention_rollout(attns, head_fusion="median")


def forced_attention_vit(patch_index: int, depth: int = 2):
    """A ViT whose every query attends (almost) only to patch token ``patch_index`` in every layer.

    Patch embedding and class token are zero, only the chosen token gets a non-zero position embedding;
    keys read that feature with a large gain and all queries share a constant bias, so the chosen token
    wins every softmax. Attention projections and MLP outputs are zero: blocks pass tokens unchanged.
    """
    torch.manual_seed(0)
    model = build_model(dict(TINY, depth=depth)).eval()
    d = model.embed_dim
    head_dim = d // model.blocks[0].attn.num_heads
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        model.cls_token.zero_()
        model.pos_embed.zero_()
        model.pos_embed[0, 1 + patch_index, 0] = 1.0
        model.pos_embed[0, 1 + patch_index, 1] = -1.0
        for blk in model.blocks:
            qkv = blk.attn.qkv
            qkv.weight.zero_()
            qkv.bias.zero_()
            for h in range(blk.attn.num_heads):
                qkv.bias[h * head_dim] = 1.0  # q: constant
                qkv.weight[d + h * head_dim, 0] = 100.0  # k: large for the chosen token only
                qkv.weight[d + h * head_dim, 1] = -100.0
            blk.attn.proj.weight.zero_()
            blk.attn.proj.bias.zero_()
            blk.mlp.fc2.weight.zero_()
            blk.mlp.fc2.bias.zero_()
    return model


def test_forced_attention_rollout_peaks_at_chosen_patch():
    patch = 12 * 7 + 3  # token row 7, column 3
    model = forced_attention_vit(patch)
    x = torch.rand(1, 2, 192, 192)
    with torch.no_grad(), AttentionCapture(model) as cap:
        model(x)
    for a in cap.attentions:
        assert a[0, :, :, 1 + patch].min() > 0.99  # every head, every query -> the chosen token
    rollout = attention_rollout(cap.attentions)
    assert int(rollout[0].argmax()) == patch
    assert float(rollout[0, patch]) == pytest.approx(0.75, abs=0.01)  # (A+I)/2 twice: 1/2 + 1/4
    _, maps = explain(model, x)
    assert maps.shape == (1, 192, 192)
    r, c = divmod(int(maps[0].argmax()), 192)
    assert 7 * 16 <= r < 8 * 16 and 3 * 16 <= c < 4 * 16
    assert float(maps.min()) == 0.0 and float(maps.max()) == 1.0


def per_cell_bilinear(grid, k=9, size=192):
    """Reference: each cell's own block of the coarse map, bilinearly upsampled on its own (F.interpolate)."""
    m = int(k**0.5)
    gh, gw = grid.shape[-2] // m, grid.shape[-1] // m
    c = size // m
    out = torch.zeros(*grid.shape[:-2], size, size)
    for i in range(m):
        for j in range(m):
            block = grid[..., i * gh : (i + 1) * gh, j * gw : (j + 1) * gw]
            out[..., i * c : (i + 1) * c, j * c : (j + 1) * c] = F.interpolate(
                block, size=(c, c), mode="bilinear", align_corners=False
            )
    return out


def test_explain_vit_upsamples_rollout_cell_by_cell(tiny_vit, grid_batch):
    logits, maps = explain(tiny_vit, grid_batch, method="auto")
    with torch.no_grad(), AttentionCapture(tiny_vit) as cap:
        want_logits = tiny_vit(grid_batch)
    grid = attention_rollout(cap.attentions).reshape(2, 1, 12, 12)
    want = minmax_normalize(per_cell_bilinear(grid)[:, 0])
    assert torch.allclose(logits, want_logits, atol=1e-5)
    # a random model's rollout spans ~1e-4, so min-max scaling magnifies float32 rounding to ~2e-5;
    # whole-image interpolation differs by up to ~0.5 near cell borders
    assert torch.allclose(maps, want, atol=1e-4)
    assert not tiny_vit.training


def test_hot_token_at_a_cell_edge_stays_on_its_slice():
    """A token at the right edge of cell (1, 0) must put nothing into cell (1, 1), another slice.

    Whole-image bilinear upsampling put ~48 % of the peak into the neighbouring cell's first 8 px.
    """
    patch = 12 * 5 + 3  # token row 5 (cell row 1), column 3 = the last token column of cell column 0
    model = forced_attention_vit(patch)
    _, maps = explain(model, torch.rand(1, 2, 192, 192))
    own = maps[0, 64:128, 0:64]
    neighbour = maps[0, 64:128, 64:128]
    assert float(own.max()) == 1.0
    background = float(maps[0, :, 128:].max())  # a cell far away: what "nothing" looks like here
    assert float(neighbour.max()) <= background + 1e-6
    assert float(neighbour[:, :8].mean()) < 0.02
    # on the token's centre row the peak is held from the token's centre (px 56) up to the cell border
    assert float(maps[0, 5 * 16 + 8, 56:64].min()) == pytest.approx(1.0, abs=1e-5)


def test_upsample_weights_never_cross_cells():
    from ipmn.cellmaps import cell_upsample_weights, upsample_cells

    for n_in in (12, 11, 6, 5, 2):  # divisible and not (AlexNet's 11 x 11, a 5 x 5 map, coarser than cells)
        w = cell_upsample_weights(192, n_in, 3)
        assert torch.allclose(w.sum(1), torch.ones(192, dtype=w.dtype))
        centres = (torch.arange(n_in) + 0.5) * 192 / n_in
        for u in range(192):
            used = w[u].nonzero().flatten()
            cells = {int(c) // 64 for c in centres[used]}
            if any(int(c) // 64 == u // 64 for c in centres):
                assert cells == {u // 64}, (n_in, u, cells)
    with pytest.raises(IPMNError, match="cells"):
        cell_upsample_weights(190, 12, 3)
    g = torch.rand(2, 1, 12, 12)
    assert torch.allclose(upsample_cells(g, (192, 192), 1),
                          F.interpolate(g, size=(192, 192), mode="bilinear", align_corners=False), atol=1e-6)


def test_explain_late_fusion_averages_branches(grid_batch):
    torch.manual_seed(0)
    model = build_model(dict(TINY, fusion="late")).eval()
    _, maps = explain(model, grid_batch)
    grids = []
    for i, branch in enumerate(model.branches.values()):
        with torch.no_grad(), AttentionCapture(branch) as cap:
            branch(grid_batch[:, i : i + 1])
        grids.append(attention_rollout(cap.attentions).reshape(2, 1, 12, 12))
    want = per_cell_bilinear((grids[0] + grids[1]) / 2)
    assert torch.allclose(maps, minmax_normalize(want[:, 0]), atol=1e-4)


def test_rollout_refuses_pooled_patch_token_heads(tiny_vit):
    """A class token that the head does not read: its attention does not explain the prediction."""
    tiny_vit.global_pool = "avg"
    try:
        with pytest.raises(IPMNError, match="global_pool='avg'"):
            explain(tiny_vit, torch.rand(1, 2, 192, 192))
    finally:
        tiny_vit.global_pool = "token"
    explain(tiny_vit, torch.rand(1, 2, 192, 192))  # class-token head: accepted
    with pytest.raises(IPMNError, match="pooled patch tokens"):  # refused when the model is built
        build_model(dict(arch="beit3_base_patch16_224", depth=1, embed_dim=48, num_heads=3))


def test_explain_refuses_bad_inputs(tiny_vit):
    with pytest.raises(IPMNError, match="channel"):
        explain(tiny_vit, torch.rand(1, 3, 192, 192))
    with pytest.raises(IPMNError, match="192"):
        explain(tiny_vit, torch.rand(1, 2, 224, 224))
    with pytest.raises(IPMNError, match="method"):
        explain(tiny_vit, torch.rand(1, 2, 192, 192), method="lime")
    with pytest.raises(IPMNError, match="CNN"):
        explain(tiny_vit, torch.rand(1, 2, 192, 192), method="gradcam")
    with pytest.raises(IPMNError, match="class_idx"):
        explain(tiny_vit, torch.rand(1, 2, 192, 192), class_idx=5)


# --------------------------------------------------------------------------------------------------
# Grad-CAM and deletion curves on a CNN trained to find a bright square
# --------------------------------------------------------------------------------------------------

SQ = 32


def square_batch(n, size, gen):
    """Dim noise background; label 1 images carry a bright SQ x SQ square at a random place."""
    x = torch.rand(n, 2, size, size, generator=gen) * 0.3
    y = torch.randint(0, 2, (n,), generator=gen)
    for i in range(n):
        if y[i] == 1:
            r, c = torch.randint(0, size - SQ, (2,), generator=gen).tolist()
            x[i, :, r : r + SQ, c : c + SQ] = 1.0
    return x, y


@pytest.fixture(scope="module")
def square_cnn():
    """resnet18 (2 channels, 2 classes) trained for a few steps at 192 px to detect a bright square."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build_model(dict(arch="resnet18", num_classes=2, class_names=["absent", "square"]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(12):
        x, y = square_batch(8, 192, gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    # recalibrate BatchNorm statistics (12 steps of momentum 0.1 leave them biased)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for _ in range(3):
            model(square_batch(16, 192, gen)[0])
    model.eval()
    x, y = square_batch(32, 192, gen)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean()
    assert acc > 0.9, f"toy CNN did not learn the square ({acc:.2f})"
    return model


def planted(r, c, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 2, 192, 192, generator=gen) * 0.3
    x[:, :, r : r + SQ, c : c + SQ] = 1.0
    return x


@pytest.mark.parametrize("r,c", [(24, 24), (24, 130), (130, 70)])
def test_gradcam_points_at_planted_square(square_cnn, r, c):
    x = planted(r, c)
    logits, maps = explain(square_cnn, x, class_idx=1)
    assert logits.argmax(1).item() == 1
    assert maps.shape == (1, 192, 192) and float(maps.min()) == 0.0 and float(maps.max()) == 1.0
    pr, pc = divmod(int(maps[0].argmax()), 192)
    tol = 32  # Grad-CAM on layer4 has stride 32: allow one feature cell around the square
    assert r - tol <= pr < r + SQ + tol and c - tol <= pc < c + SQ + tol, (pr, pc)
    inside = maps[0, r : r + SQ, c : c + SQ].mean()
    outside = (maps[0].sum() - maps[0, r : r + SQ, c : c + SQ].sum()) / (192 * 192 - SQ * SQ)
    assert inside > 2 * outside  # not inverted (MONAI's default normaliser would flip this)


def test_gradcam_leaves_model_clean_and_is_per_sample(square_cnn):
    layer = dict(square_cnn.named_modules())[GRADCAM_TARGET_LAYERS["resnet18"]]
    x = torch.cat([planted(24, 24), torch.rand(1, 2, 192, 192) * 0.3])
    logits, maps = explain(square_cnn, x)  # predicted classes differ within the batch
    assert logits.argmax(1).tolist() == [1, 0]
    assert not layer._forward_hooks and not layer._backward_hooks and not square_cnn._forward_hooks
    for i in range(2):
        li, mi = explain(square_cnn, x[i : i + 1])
        assert torch.allclose(li, logits[i : i + 1], atol=1e-5)
        assert torch.allclose(mi, maps[i : i + 1], atol=1e-5)
    assert not square_cnn.training
    with pytest.raises(IPMNError, match="Rollout"):
        explain(square_cnn, x, method="rollout")


def _monai_gradcam(model, x, layer, class_idx, per_cell: bool = True):
    """MONAI's GradCAM (an independent implementation) on a copy, so that its hooks stay on the copy;
    its map upsampled cell by cell (as ours) or, with ``per_cell=False``, over the whole tiled image."""
    import copy

    from monai.visualize import GradCAM

    from ipmn.cellmaps import upsample_cells

    twin = copy.deepcopy(model).eval()
    kwargs = {"upsampler": (lambda size: lambda a: upsample_cells(a, size, 9))} if per_cell else {}
    cam = GradCAM(nn_module=twin, target_layers=layer, postprocessing=minmax_normalize, **kwargs)
    return torch.cat([cam(x[i : i + 1], class_idx=c)[:, 0] for i, c in enumerate(class_idx)])


def test_gradcam_upsamples_cell_by_cell(square_cnn):
    """Grad-CAM's 6 x 6 map is upsampled within each cell, like rollout, not across cell borders."""
    x = planted(24, 40)  # square straddling pixel 64: the raw map is hot on both sides of the border
    _, maps = explain(square_cnn, x, class_idx=1)
    whole = _monai_gradcam(square_cnn, x, GRADCAM_TARGET_LAYERS["resnet18"], [1], per_cell=False)
    assert not torch.allclose(maps, whole, atol=1e-3)  # the old whole-image upsampling differs


def test_gradcam_equals_monai_gradcam(square_cnn):
    x = torch.cat([planted(24, 24), planted(130, 70), torch.rand(1, 2, 192, 192) * 0.3])
    square_cnn.zero_grad(set_to_none=True)
    for classes in ([1, 0, 1], None):
        logits, maps = explain(square_cnn, x, class_idx=classes)
        reference = _monai_gradcam(square_cnn, x, "layer4", classes or logits.argmax(1).tolist())
        torch.testing.assert_close(maps, reference, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in square_cnn.parameters())  # autograd.grad leaves no .grad behind


@pytest.mark.parametrize(("arch", "seed", "classes"), [("alexnet", 1, [2, 0]), ("smallcnn", 2, [1, 2])])
def test_gradcam_zoo_target_equals_monai(arch, seed, classes):
    # alexnet: its target is an in-place ReLU; smallcnn: global max pooling after the target block
    torch.manual_seed(seed)
    model = build_model(dict(arch=arch)).eval()
    x = torch.rand(2, 2, 192, 192)
    logits, maps = explain(model, x, class_idx=classes)
    torch.testing.assert_close(maps, _monai_gradcam(model, x, GRADCAM_TARGET_LAYERS[arch], classes),
                               rtol=1e-4, atol=1e-5)
    target = dict(model.named_modules())[GRADCAM_TARGET_LAYERS[arch]]
    assert not target._forward_hooks and float(maps.max()) == 1.0


def test_deletion_curve_saliency_beats_random(square_cnn):
    x = planted(130, 70)
    _, maps = explain(square_cnn, x, class_idx=1)
    res = deletion_curve(square_cnn, x, maps[0], class_idx=1, patch=16, steps=12, seed=0)
    assert len(res["curve_saliency"]) == len(res["curve_random"]) == 13
    assert res["fractions"][0] == 0.0 and res["fractions"][-1] == 1.0
    assert res["curve_saliency"][0] == pytest.approx(res["curve_random"][0])
    assert res["curve_saliency"][0] > 0.6
    assert res["auc_saliency"] < res["auc_random"]
    # an anti-saliency map (square last) must do worse than the real one
    worst = deletion_curve(square_cnn, x, 1 - maps[0], class_idx=1, patch=16, steps=12, seed=0)
    assert worst["auc_saliency"] > res["auc_saliency"]
    with pytest.raises(IPMNError, match="patch"):
        deletion_curve(square_cnn, x, maps[0], class_idx=1, patch=50)


# --------------------------------------------------------------------------------------------------
# cell-wise TTA
# --------------------------------------------------------------------------------------------------


def grid_image():
    """3x3 cells of 64 px: each cell has its own offset and an asymmetric ramp."""
    ramp = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) / 4096
    img = torch.zeros(2, 192, 192)
    for i in range(3):
        for j in range(3):
            img[:, i * 64 : (i + 1) * 64, j * 64 : (j + 1) * 64] = ramp + 10 * (3 * i + j)
    img[1] += 100
    return img


def test_tta_transforms_act_per_cell_in_place_and_invert():
    img = grid_image()
    pairs = tta_transforms()
    assert len(pairs) == 5 and len(tta_transforms(with_flip_rot=True)) == 8
    ramp = img[0, :64, :64] - 0
    expected_cell = {
        "identity": ramp,
        "hflip": torch.flip(ramp, dims=(-1,)),
        "rot90": torch.rot90(ramp, 1, dims=(-2, -1)),
        "rot180": torch.rot90(ramp, 2, dims=(-2, -1)),
        "rot270": torch.rot90(ramp, 3, dims=(-2, -1)),
    }
    for fwd, inv in pairs:
        out = fwd(img)
        assert out.shape == img.shape
        for i in range(3):
            for j in range(3):
                cell = out[:, i * 64 : (i + 1) * 64, j * 64 : (j + 1) * 64]
                offset = 10 * (3 * i + j)
                # the cell stays on its slice (offset) and is transformed in place
                assert torch.allclose(cell[0] - offset, expected_cell[fwd.name]), (fwd.name, i, j)
                assert torch.allclose(cell[1] - offset - 100, expected_cell[fwd.name])
        assert torch.equal(inv(out), img)
        assert torch.equal(inv(fwd(img[None])), img[None])  # works on batches (..., H, W)
    for fwd, inv in tta_transforms(with_flip_rot=True):
        assert torch.equal(inv(fwd(img)), img)
    # a flips-only model's views never swap the axes: the identity, both flips and their product
    flips_only = tta_transforms(with_flip_rot=True, quarter_turns=False)
    assert [f.name for f, _ in flips_only] == ["identity", "hflip", "rot180", "rot180+hflip"]
    for fwd, inv in flips_only:
        assert torch.equal(inv(fwd(img)), img)
    # not the same as transforming the whole 192-px image
    whole = torch.rot90(img, 1, dims=(-2, -1))
    assert not torch.equal(pairs[2][0](img), whole)


def test_cellwise_and_random_augmentation():
    img = grid_image()
    double = cellwise(lambda t: t * 2, k=9, cell=64)
    assert torch.equal(double(img), img * 2)
    with pytest.raises(IPMNError):
        cellwise(lambda t: t, k=8, cell=64)
    with pytest.raises(IPMNError, match="grid"):
        double(torch.zeros(2, 100, 100))
    gen = torch.Generator().manual_seed(0)
    batch = img[None].repeat(8, 1, 1, 1)
    out = random_cell_transform(batch, generator=gen)
    # every cell of every sample keeps its slice's values, channels get the same transform
    cell_sums = out.reshape(8, 2, 3, 64, 3, 64).sum(dim=(3, 5))
    assert torch.allclose(cell_sums, batch.reshape(8, 2, 3, 64, 3, 64).sum(dim=(3, 5)))
    assert len({tuple(o[0, :64, :64].flatten()[:3].tolist()) for o in out}) > 1
