"""The model registry (``ipmn.registry``): pure Python, no Slicer."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from conftest_slicer import fake_package  # puts the module folders on sys.path

from ipmn import registry
from ipmn.errors import IPMNError


def test_models_dir_env_override_and_platform_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("IPMN_MODELS_DIR", str(tmp_path / "shared" / "models"))
    assert registry.user_models_dir() == tmp_path / "shared" / "models"
    assert not (tmp_path / "shared").exists()
    assert registry.user_models_dir(create=True).is_dir()
    monkeypatch.delenv("IPMN_MODELS_DIR")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert registry.user_models_dir() == tmp_path / "xdg" / "IPMN" / "models"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    assert registry.user_models_dir() == tmp_path / "Local" / "IPMN" / "models"  # not roaming: large files
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert (
        registry.user_models_dir()
        == tmp_path / "home" / "Library" / "Application Support" / "IPMN" / "models"
    )


def test_validate_lists_every_problem(tmp_path):
    assert registry.validate_package(fake_package(tmp_path / "ok"))["arch"] == "vit_tiny_patch16_224"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IPMNError) as info:
        registry.validate_package(empty)
    assert "model.safetensors is missing" in str(info.value) and "config.json is missing" in str(info.value)
    with pytest.raises(IPMNError, match="not found"):
        registry.validate_package(tmp_path / "nowhere")

    bad = fake_package(tmp_path / "bad")
    (bad / "config.json").write_text("{not json")
    (bad / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    with pytest.raises(IPMNError) as info:
        registry.validate_package(bad)
    assert "Git LFS pointer" in str(info.value) and "not valid JSON" in str(info.value)

    truncated = fake_package(tmp_path / "truncated")
    (truncated / "model.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    (truncated / "config.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(IPMNError) as info:
        registry.validate_package(truncated)
    assert "truncated" in str(info.value) and "'arch'" in str(info.value)


def test_register_copy_reference_list_and_remove(tmp_path):
    models = tmp_path / "models"
    bundled = fake_package(tmp_path / "module" / "DemoModel", name="Demo model")
    source = fake_package(tmp_path / "usb" / "hospital_model", name="Hospital ViT")
    copied = registry.register_model(source, models_dir=models)
    assert copied.source == "user" and copied.valid and copied.path.parent == models
    assert (copied.path / "model.safetensors").is_file() and copied.name == "Hospital ViT"
    again = registry.register_model(source, models_dir=models)  # same name: a second folder, not overwritten
    assert again.path.name == "Hospital-ViT-2"
    shared = fake_package(tmp_path / "share" / "big", name="Shared model")
    ref = registry.register_model(shared, copy=False, models_dir=models)
    assert ref.source == "reference" and ref.path == shared.resolve()
    registry.register_model(shared, copy=False, models_dir=models)  # no duplicate reference

    listed = registry.list_models([bundled], models)
    assert [(m.source, m.name) for m in listed] == [
        ("bundled", "Demo model"),
        ("user", "Hospital ViT"),
        ("user", "Hospital ViT"),
        ("reference", "Shared model"),
    ]
    assert listed[0].label() == "Demo model [bundled]"
    summary = listed[0].summary()
    assert (
        "not for clinical use" in summary
        and "accuracy 0.80±0.05" in summary
        and "Trained on: phantoms" in summary
    )
    assert registry.find_model(ref.id, [bundled], models).path == ref.path

    broken = models / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert all(m.valid for m in registry.list_models([bundled], models))
    invalid = [m for m in registry.list_models([bundled], models, include_invalid=True) if not m.valid]
    assert len(invalid) == 1 and "model.safetensors is missing" in invalid[0].problem
    assert invalid[0].label().endswith("[invalid]")

    registry.unregister_model(ref, models_dir=models)
    registry.unregister_model(again, models_dir=models)
    assert not again.path.exists() and shared.exists()  # a referenced folder is never deleted
    assert [m.name for m in registry.list_models((), models)] == ["Hospital ViT"]
    with pytest.raises(IPMNError, match="bundled"):
        registry.unregister_model(listed[0], models_dir=models)
    with pytest.raises(IPMNError, match="not a usable"):
        registry.register_model(broken, models_dir=models)


def test_register_ensemble_of_folds(tmp_path):
    models = tmp_path / "models"
    folds = [
        fake_package(tmp_path / "run" / "vit" / f"fold_{i}" / "model", name=f"fold {i}") for i in range(3)
    ]
    info = registry.register_ensemble(folds, "CV ensemble", models_dir=models)
    assert info.is_ensemble and info.valid and info.name == "CV ensemble"
    assert [p.name for p in info.members] == ["fold_0", "fold_1", "fold_2"]
    assert info.primary == info.members[0] and info.ensemble_members == info.members
    assert info.label() == "CV ensemble (ensemble of 3)"
    manifest = json.loads((info.path / "ensemble.json").read_text())
    assert manifest["schema"] == "ipmn.ensemble/1" and manifest["members"] == ["fold_0", "fold_1", "fold_2"]
    # a registered ensemble folder can be copied again (e.g. to another machine's models folder)
    copy = registry.register_model(info.path, models_dir=tmp_path / "other")
    assert copy.is_ensemble and len(copy.members) == 3 and copy.valid
    (folds[1] / "config.json").unlink()
    with pytest.raises(IPMNError, match="member 1"):
        registry.register_ensemble(folds, "broken", models_dir=models)
    single = registry.model_info(folds[0])
    assert not single.is_ensemble and single.ensemble_members == [] and single.primary == folds[0]


def test_failed_copy_leaves_nothing(tmp_path, monkeypatch):
    models = tmp_path / "models"
    source = fake_package(tmp_path / "src", name="m")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(registry.shutil, "copy2", boom)
    with pytest.raises(IPMNError, match="No space left"):
        registry.register_model(source, models_dir=models)
    assert [p for p in models.iterdir()] == []


def test_format_metrics_accepts_numbers_and_mean_std():
    assert (
        registry.format_metrics({"accuracy": 0.7, "macro_f1": {"mean": 0.6, "std": 0.1}})
        == "accuracy 0.70, macro_f1 0.60±0.10"
    )
    assert registry.format_metrics(None) == ""


def test_model_picker_shows_the_most_honest_metrics_and_says_what_they_are():
    validation = {"accuracy": 0.89, "balanced_accuracy": 0.89, "selection_biased": True}
    cv = {"summary": {"accuracy": {"mean": 0.52, "std": 0.11}}}
    held_out = {"cohort": "90 fresh phantoms (seed 77)", "metrics": {"accuracy": 0.63}}
    metrics, source = registry.honest_metrics({"validation": validation})
    assert metrics is validation and "optimistic" in source
    metrics, source = registry.honest_metrics({"validation": validation, "cv_metrics": cv})
    assert metrics is cv and "cross-validation" in source
    metrics, source = registry.honest_metrics({"validation": validation, "cv_metrics": cv, "evaluation": held_out})
    assert metrics == {"accuracy": 0.63} and "held-out" in source and "seed 77" in source
    assert registry.honest_metrics({}) == ({}, "")


def test_the_shipped_demo_model_is_not_advertised_with_its_selection_metrics():
    info = registry.model_info(Path(__file__).resolve().parents[1] / "Resources" / "DemoModel", source="bundled")
    text = info.summary()
    assert "Metrics (" in text and info.metrics_source
    assert "optimistic" not in info.metrics_source, text  # the demo model has honest numbers (CV or held-out)


def test_registry_is_pure_python():
    source = Path(registry.__file__).read_text(encoding="utf-8")
    for name in ("slicer", "qt", "vtk", "torch", "ctk"):
        assert f"import {name}" not in source and f"from {name}" not in source
