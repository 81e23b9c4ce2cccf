"""The auxiliary lesion-map loss (``train.lesion_loss``, :mod:`ipmn.lesionloss`): masks on the ROI grid,
augmented as the image is, block targets, the balanced loss, the training head and its checkpoint.

Whether the loss makes a network find the nodule is measured by the learning test (``test_learning``),
whose preset uses it, and in the README's lever table (with and without it, same cases).
"""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch

from conftest import run_cli, shared_cohort
from ipmn.errors import IPMNError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {
    "model": {"arch": "vit_tiny_patch16_224", "depth": 2, "embed_dim": 96, "num_heads": 3},
    "preprocess": {"n4": False, "smoothing": "none"},
    "train": {"epochs": 2, "optimizer": "adamw", "lr": 1e-3, "windows_per_case": 2, "batch_size": 8, "seed": 1,
              "lesion_loss": 1.0, "keep_checkpoint": True},
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return shared_cohort(tmp_path_factory)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "ipmn_grid_cache"


def _cfg(cache, **train):
    cfg = copy.deepcopy(TINY)
    cfg["train"].update(train)
    cfg["data"] = {"cache_dir": str(cache)}
    return cfg


# ------------------------------------------------------------------------------------------------ masks
def test_the_mask_lands_on_the_lesion_of_the_image(cohort, cache_dir):
    """On each lesion phantom's ROI grid, the cyst label covers fluid (bright T2, dark T1) and the nodule
    label soft tissue brighter than that fluid on T1: the mask is resampled into the image's geometry."""
    from ipmn.cohort import load_cohort
    from ipmn.config import resolve_config
    from ipmn.lesionloss import lesion_grids
    from ipmn.windows import load_grids

    cases = [c for c in load_cohort(cohort) if c.label > 0]
    cfg = resolve_config(_cfg(cache_dir))
    grids = load_grids(cases, cfg)
    lesions = lesion_grids(cases, grids, 9)
    nodules = 0
    for c, les in zip(cases, lesions, strict=True):
        t1, t2 = grids[c.case_id].data[:, : les.shape[0]]
        assert set(np.unique(les)) <= {0, 1, 2, 3}
        cyst, outside = les == 1, les == 0
        if cyst.sum() > 20:
            assert np.median(t2[cyst]) > np.percentile(t2[outside], 75), c.case_id
            assert np.median(t1[cyst]) < np.median(t1[outside]), c.case_id
        if (les == 2).sum() > 3 and cyst.sum() > 20:
            nodules += 1
            assert np.median(t1[les == 2]) > np.median(t1[cyst]), c.case_id
    assert nodules >= 1


def test_lesion_windows_follow_every_flip_and_turn():
    """Plant the labels as the image itself: every augmented sample's label tile equals its image tile."""
    from ipmn.windows import WindowDataset

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (12, 8, 8)).astype(np.uint8)
    image = np.stack([labels, labels]).astype(np.float32)
    for turns in (True, False):
        ds = WindowDataset([image, image], [1, 2], 9, 8, augment=True, quarter_turns=turns,
                           lesions=[labels, None])
        ds.plan = [(ci, s, f, r) for ci in (0, 1) for s in (0, 3) for f in (0, 1) for r in range(4)]
        for i, (ci, *_rest) in enumerate(ds.plan):
            x, y, les, has = ds[i]
            assert y == (1, 2)[ci] and les.shape == (1, 24, 24) and les.dtype == torch.uint8
            if ci == 0:
                assert has == 1 and torch.equal(les[0].float(), x[0])
            else:
                assert has == 0 and not les.any()


def test_block_targets_put_a_planted_label_in_its_block():
    """The highest label of each block: a one-pixel nodule (2) inside a cyst (1) names its block."""
    from ipmn.lesionloss import block_targets

    labels = torch.zeros(1, 1, 192, 192, dtype=torch.uint8)
    labels[0, 0, 90:110, 30:60] = 1
    labels[0, 0, 100, 37] = 2  # block (12, 4) at stride 8, (6, 2) at stride 16
    t8 = block_targets(labels, (24, 24))
    assert t8.shape == (1, 24, 24) and t8.dtype == torch.long
    assert torch.nonzero(t8[0] == 2).tolist() == [[12, 4]]
    assert (t8[0] == 1).sum() == 3 * 5 - 1 and not t8[0, :11].any()  # rows 11-13, columns 3-7
    assert torch.nonzero(block_targets(labels, (12, 12))[0] == 2).tolist() == [[6, 2]]


def test_label_weights_come_from_the_training_masks_central_windows():
    """Inverse block frequency over the central windows only, capped; slices outside them do not count."""
    from ipmn.lesionloss import MAX_WEIGHT, label_weights

    les = np.zeros((13, 64, 64), np.uint8)  # central window of 13 slices: 2..10
    les[2:11, :, :32] = 1  # the left half of every central cell is cyst
    les[6, 0:8, 40:48] = 3  # one block of duct in one cell
    les[0, :, :] = 2  # a nodule label only outside the central window
    w = label_weights([les, None], 9, (24, 24), 3)
    blocks = 24 * 24
    n_duct, n_cyst = 1, blocks // 2
    assert w[2] == 0  # never in a central window
    assert w[1] == pytest.approx(blocks / (4 * n_cyst)) and w[0] == pytest.approx(blocks / (4 * (blocks - 1 - n_cyst)))
    assert w[3] == MAX_WEIGHT > blocks / (4 * n_duct) / 3


def test_the_loss_rewards_the_right_map_and_ignores_cases_without_a_mask():
    from ipmn.lesionloss import block_targets, lesion_map_loss

    labels = torch.zeros(3, 1, 192, 192, dtype=torch.uint8)
    labels[0, 0, 100:104, 37:40] = 2
    labels[1, 0, 10:60, 10:60] = 1
    has = torch.tensor([1, 1, 1])
    weight = torch.tensor([0.3, 4.0, 50.0])
    target = block_targets(labels, (24, 24))
    right = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 16 - 8
    wrong = right.roll(1, dims=1)
    assert lesion_map_loss(right, labels, has, weight) < 0.01 < 5 < lesion_map_loss(wrong, labels, has, weight)
    # the weights count: missing the one nodule block costs more than missing one background block
    miss_nodule, miss_bg = right.clone(), right.clone()
    r, c = torch.nonzero(target[0] == 2)[0].tolist()
    miss_nodule[0, :, r, c] = torch.tensor([8.0, -8.0, -8.0])
    miss_bg[2, :, 0, 0] = torch.tensor([-8.0, -8.0, 8.0])
    assert lesion_map_loss(miss_nodule, labels, has, weight) > 10 * lesion_map_loss(miss_bg, labels, has, weight)
    # the third case without a mask: whatever its labels and logits, the loss is that of the first two
    noisy = labels.clone()
    noisy[2, 0, :50, :50] = 2
    garbage = right.clone()
    garbage[2] = torch.randn(3, 24, 24) * 10
    kept = lesion_map_loss(garbage[:2], labels[:2], has[:2], weight)
    assert torch.allclose(lesion_map_loss(garbage, noisy, torch.tensor([1, 1, 0]), weight), kept)
    assert lesion_map_loss(garbage, noisy, torch.tensor([0, 0, 0]), weight) == 0


@pytest.mark.parametrize("arch, size", [("smallcnn", (24, 24)), ("resnet18", (6, 6)), ("alexnet", (11, 11)),
                                        ("vit", (12, 12))])
def test_the_head_reads_the_last_feature_map(arch, size):
    from ipmn.config import resolve_config
    from ipmn.lesionloss import WithLesionHead
    from ipmn.models import build_model

    model = (TINY["model"] if arch == "vit" else {"arch": arch, "pretrained": None})
    mcfg = resolve_config({"model": model})["model"]
    net = build_model(mcfg)
    both = WithLesionHead(net, 3, 192, 2)
    x = torch.randn(2, 2, 192, 192)
    logits, maps = both(x)
    assert logits.shape == (2, 3) and maps.shape == (2, 4, *size) and both.map_size == size
    net.eval()
    assert torch.allclose(net(x), both.net(x))  # the classifier is the package's model, unchanged
    assert not any(k.startswith("lesion_head") for k in net.state_dict())


def test_late_fusion_and_maskless_cohorts_are_refused(cohort, cache_dir, tmp_path):
    from ipmn.cohort import load_cohort
    from ipmn.config import resolve_config
    from ipmn.lesionloss import feature_layer, lesion_grids
    from ipmn.models import build_model

    late = resolve_config({"model": {**TINY["model"], "fusion": "late"}})["model"]
    with pytest.raises(IPMNError, match="early-fusion"):
        feature_layer(build_model(late))
    rows = list(csv.DictReader(open(cohort, encoding="utf-8")))
    for r in rows:
        r["lesion"] = ""
    bare = cohort.parent / "no_lesions.csv"
    with open(bare, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cases = load_cohort(bare)[:4]
    with pytest.raises(IPMNError, match="lesion_loss needs lesion masks"):
        lesion_grids(cases, {}, 9)
    # from the command line: one clear line, before any preprocessing, nothing written
    empty_cache = tmp_path / "cache"
    proc = run_cli("train", "--cohort", bare, "--config", "demo", "--out", tmp_path / "model",
                   "--work-dir", tmp_path / "work", "--device", "cpu", env={"IPMN_CACHE_DIR": str(empty_cache)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("ipmn: error: train.lesion_loss needs lesion masks")
    assert not (tmp_path / "model").exists() and not list(empty_cache.glob("grids/*"))
    for bad in (-1, "1", float("inf")):
        with pytest.raises(IPMNError, match="lesion_loss"):
            resolve_config({"train": {"lesion_loss": bad}})


def test_a_non_label_mask_is_refused(phantom_case, tmp_path):
    import SimpleITK as sitk

    from ipmn.grid import make_roi_grid
    from ipmn.lesionloss import labels_on_grid

    case = phantom_case["case"]
    grid = make_roi_grid(case["roi"], case["t1"])
    prob = sitk.Cast(case["lesion"], sitk.sitkFloat32) * 0.37  # a probability map, not labels
    sitk.WriteImage(prob, str(tmp_path / "prob.nii.gz"))
    with pytest.raises(IPMNError, match="integer labels"):
        labels_on_grid(tmp_path / "prob.nii.gz", grid)
    assert labels_on_grid(phantom_case["lesion"], grid).max() >= 1


# ------------------------------------------------------------------------------------------------ training
def test_training_with_the_lesion_loss_resumes_exactly_and_ships_the_plain_model(cohort, cache_dir, tmp_path,
                                                                                  monkeypatch):
    """Two epochs straight vs interrupted after epoch 1 and resumed: the same weights, head included (the
    head and its optimiser state are in the checkpoint); the package holds the classifier only; without
    the loss the run learns something else."""
    from safetensors.torch import load_file

    from ipmn.checkpoint import read_tensors
    from ipmn.cohort import load_cohort
    from ipmn.models import load_package
    from ipmn.train import Trainer, train_model

    cases = load_cohort(cohort)
    straight = train_model(cases, _cfg(cache_dir), tmp_path / "a")
    original = Trainer.run_epoch

    def interrupted(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "run_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_model(cases, _cfg(cache_dir), tmp_path / "b")
    _, state = read_tensors(tmp_path / "b" / "checkpoint.safetensors")
    assert state["epoch"] == 1
    monkeypatch.setattr(Trainer, "run_epoch", original)
    resumed = train_model(cases, _cfg(cache_dir), tmp_path / "b", resume=True)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]
    a, _ = read_tensors(tmp_path / "a" / "checkpoint.safetensors")
    b, _ = read_tensors(tmp_path / "b" / "checkpoint.safetensors")
    heads = [k for k in a if k.startswith("model.lesion_head.")]
    assert heads and all(torch.equal(a[k], b[k]) for k in a if k.startswith(("model.", "optim.")))
    pkg = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    assert pkg and not any("lesion" in k for k in pkg)
    assert all(torch.equal(pkg[k].float(), a[f"model.net.{k}"].float()) for k in pkg)
    net, config = load_package(tmp_path / "a" / "model")
    assert config["arch"] == "vit_tiny_patch16_224" and net(torch.zeros(1, 2, 192, 192)).shape == (1, 3)
    plain = train_model(cases, _cfg(cache_dir, lesion_loss=0.0), tmp_path / "p", package_dir=False)
    assert [h["train_loss"] for h in plain["history"]] != [h["train_loss"] for h in straight["history"]]


def test_table_variants_keep_the_masks_except_late_fusion():
    """In `ipmn cv --models/--fusion` every early-fusion variant (ViT or CNN baseline) learns from the masks;
    a late-fusion ViT, whose two branches have no one feature map, trains without them."""
    from ipmn.config import load_config, resolve_config
    from ipmn.cv import make_variants, variant_config

    demo = resolve_config(load_config("demo"))
    variants = make_variants(demo, models=["vit_tiny_patch16_224"], fusions=["early", "late"])
    variants += make_variants(demo, models=["resnet18"])
    got = {(v["arch"], v["fusion"]): variant_config(demo, v)["train"]["lesion_loss"] for v in variants}
    assert got == {("vit_tiny_patch16_224", "early"): 1.0, ("vit_tiny_patch16_224", "late"): 0.0,
                   ("resnet18", "early"): 1.0}
