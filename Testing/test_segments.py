"""Segments by name: a .seg.nrrd holding pancreas + two other organs, a .mrk.json with two ROIs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from organs_segmentation import write_organs

from conftest import run_cli
from ipmn.errors import IPMNError
from ipmn.phantoms import make_case, write_case
from ipmn.roi import load_roi, roi_from_mask, write_mrk_json


@pytest.fixture(scope="module")
def seg_case(tmp_path_factory):
    """A phantom, its pancreas mask, and a .seg.nrrd with 'liver', 'pancreas' (coded) and 'spleen'.

    The liver and spleen blocks overlap the pancreas, so slicerio stores them in a second layer.
    """
    base = tmp_path_factory.mktemp("seg")
    case = make_case(3, 2, t1_shape=(96, 96, 30), t2_shape=(96, 96, 30), t1_orientation="LPS")
    paths = write_case(case, base, "c")
    path = base / "organs.seg.nrrd"
    seg = write_organs(path, case["mask"])
    return {"paths": paths, "seg": path, "case": case, "layers": seg["voxels"].ndim}


def test_multi_segment_file_lists_its_segments(seg_case):
    assert seg_case["layers"] == 4  # overlapping segments: the multi-layer case of issue 15
    with pytest.raises(IPMNError) as err:
        load_roi(seg_case["seg"])
    msg = str(err.value)
    assert "3 segments" in msg and "--mask-segment" in msg
    assert all(f"'{n}'" in msg for n in ("liver", "pancreas", "spleen"))
    with pytest.raises(IPMNError, match="no segment named or coded 'kidney'"):
        load_roi(seg_case["seg"], segment="kidney")


@pytest.mark.parametrize("choice", ["pancreas", "PANCREAS", "Pancreas", "SCT^15776009"])
def test_segment_by_name_or_terminology_gives_the_pancreas_box(seg_case, choice):
    expected = roi_from_mask(seg_case["case"]["mask"], margin_mm=10.0)  # from the phantom's own mask
    roi = load_roi(seg_case["seg"], margin_mm=10.0, segment=choice)
    np.testing.assert_allclose(roi.center, expected.center, atol=1e-3)
    np.testing.assert_allclose(roi.size, expected.size, atol=1e-3)
    liver = load_roi(seg_case["seg"], margin_mm=10.0, segment="Liver")
    assert not np.allclose(liver.center, expected.center, atol=1.0)


def test_single_label_mask_still_works_and_takes_a_label_value(seg_case):
    expected = roi_from_mask(seg_case["case"]["mask"], margin_mm=5.0)
    roi = load_roi(seg_case["paths"]["mask"], margin_mm=5.0)
    np.testing.assert_allclose(roi.center, expected.center, atol=1e-3)
    roi = load_roi(seg_case["paths"]["mask"], margin_mm=5.0, segment="1")
    np.testing.assert_allclose(roi.center, expected.center, atol=1e-3)
    with pytest.raises(IPMNError, match="no named segments"):
        load_roi(seg_case["paths"]["mask"], segment="pancreas")
    with pytest.raises(IPMNError, match="not a box"):
        load_roi("1,2,3:40,30,20", segment="pancreas")


def test_mrk_json_with_two_rois(seg_case, tmp_path):
    from ipmn.roi import roi_from_center_size

    a, b = roi_from_center_size([10, 20, 30], [40, 30, 20]), roi_from_center_size([-50, 0, 5], [20, 20, 20])
    write_mrk_json(a, tmp_path / "a.mrk.json", name="Pancreas ROI")
    write_mrk_json(b, tmp_path / "b.mrk.json", name="Kidney ROI")
    doc = json.loads((tmp_path / "a.mrk.json").read_text())
    doc["markups"] += json.loads((tmp_path / "b.mrk.json").read_text())["markups"]
    both = tmp_path / "two.mrk.json"
    both.write_text(json.dumps(doc))
    with pytest.raises(IPMNError) as err:
        load_roi(both)
    assert "2 ROIs" in str(err.value) and "'Pancreas ROI'" in str(err.value) and "'Kidney ROI'" in str(err.value)
    np.testing.assert_allclose(load_roi(both, segment="kidney roi").center, [-50, 0, 5], atol=1e-6)
    np.testing.assert_allclose(load_roi(both, segment="Pancreas ROI").size, [40, 30, 20], atol=1e-6)
    with pytest.raises(IPMNError, match="no ROI named 'Liver'"):
        load_roi(both, segment="Liver")


def test_cli_grid_mask_segment(seg_case, tmp_path):
    p = seg_case["paths"]
    common = ("grid", "--t1", p["t1"], "--t2", p["t2"], "--mask", seg_case["seg"], "--out")
    proc = run_cli(*common, tmp_path / "a")
    assert proc.returncode == 2 and proc.stderr.startswith("ipmn: error: ROI:") and "'pancreas'" in proc.stderr
    proc = run_cli(*common, tmp_path / "b", "--mask-segment", "Pancreas")
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "b" / "grid.json").read_text())
    expected = roi_from_mask(seg_case["case"]["mask"], margin_mm=10.0)
    np.testing.assert_allclose(info["roi"]["center_ras"], expected.center, atol=1e-3)


def test_cohort_column_mask_segment_reaches_the_cache(seg_case, tmp_path):
    from ipmn.cache import GridCache
    from ipmn.cohort import load_cohort
    from ipmn.preprocess import PreprocessConfig

    p = seg_case["paths"]
    manifest = tmp_path / "cohort.csv"
    rows = [f"a,{p['t1']},{p['t2']},,high,{seg_case['seg']},pancreas", f"b,{p['t1']},{p['t2']},,high,{seg_case['seg']},"]
    manifest.write_text("case_id,t1,t2,roi,label,mask,mask_segment\n" + "\n".join(rows) + "\n")
    good, bad = load_cohort(manifest, ("t1", "t2"))
    cache = GridCache(PreprocessConfig.from_dict({"n4": False, "smoothing": "none"}), ("t1", "t2"),
                      cache_dir=tmp_path / "cache")
    assert cache.key(good) != cache.key(bad)
    assert cache._build(good).data.shape[0] == 2
    with pytest.raises(IPMNError, match="3 segments"):
        cache._build(bad)
