"""Training: config validation, the grid cache, determinism, kill-and-resume, disk full, folder policy, DDP.

Real phantom data and a real (2-layer, 96-wide) ViT at 192 px; a few epochs each.
"""

from __future__ import annotations

import argparse
import copy
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_cohort
from ipmn.errors import IPMNError

TINY = {
    "model": {"arch": "vit_tiny_patch16_224", "depth": 2, "embed_dim": 96, "num_heads": 3},
    "preprocess": {"n4": False, "smoothing": "none"},
    "train": {
        "epochs": 2,
        "optimizer": "adamw",
        "lr": 1e-3,
        "windows_per_case": 3,
        "batch_size": 8,
        "seed": 1,
        "warmup_epochs": 1,
        "schedule": "cosine",
    },
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(cache, **train) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg["train"].update(train)
    cfg["data"] = {"cache_dir": str(cache)}
    return cfg


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    return shared_cohort(tmp_path_factory)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "ipmn_grid_cache"


@pytest.fixture(scope="session")
def cases(cohort):
    from ipmn.cohort import load_cohort

    return load_cohort(cohort)


def _split(cases):
    """A fixed, class-balanced train/validation split (phantom patients = cases)."""
    val = []
    for label in (0, 1, 2):
        val += [c for c in cases if c.label == label][:2]
    ids = {c.case_id for c in val}
    return [c for c in cases if c.case_id not in ids], val


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"train": {"learning_rate": 0.1}}, "learning_rate"),
        ({"cv": {"outer_folds": 3}}, "outer_folds"),
        ({"data": {"padding": True}}, "padding"),
        ({"model": {"layers": 2}}, "layers"),
        ({"preprocess": {"n5": True}}, "n5"),
        ({"trainer": {}}, "trainer"),
    ],
)
def test_unknown_config_key_is_named_with_valid_keys(raw, needle):
    from ipmn.config import resolve_config

    with pytest.raises(IPMNError) as err:
        resolve_config(raw)
    assert needle in str(err.value) and "valid" in str(err.value)


def test_bad_config_values():
    from ipmn.config import resolve_config

    for raw in (
        {"train": {"optimizer": "lamb"}},
        {"train": {"lr": -1}},
        {"train": {"class_weights": [1, 2]}},
        {"cv": {"select": ["lr"]}},
        {"cv": {"select": ["epoch", "lr"]}},
        {"train": {"amp": "fp8"}},
        {"train": {"quarter_turns": "no"}},
        {"train": {"distill_temperature": 0}},
        {"train": {"distill_temperature": "warm"}},
    ):
        with pytest.raises(IPMNError):
            resolve_config(raw)


def test_presets_and_overrides(tmp_path):
    from ipmn.config import list_presets, load_config, resolve_config

    assert {"paper", "reference", "practical", "demo"} <= set(list_presets())
    paper = resolve_config(load_config("paper"))
    assert (
        paper["train"]["optimizer"],
        paper["train"]["lr"],
        paper["train"]["batch_size"],
        paper["train"]["epochs"],
    ) == ("adam", 0.003, 8, 3000)
    assert paper["model"]["arch"].startswith("vit_base_patch16_224") and paper["model"]["img_size"] == 192
    ref = resolve_config(load_config("reference"))
    assert ref["model"]["depth"] == 6 and ref["train"]["optimizer"] == "sgd" and ref["train"]["lr"] == 0.03
    assert ref["train"]["class_weights"] == [1.0, 0.65, 0.45] and ref["train"]["windows_per_case"] == 1
    practical = resolve_config(load_config("practical"))
    assert practical["train"]["optimizer"] == "adamw" and practical["train"]["schedule"] == "cosine"
    assert practical["train"]["warmup_epochs"] > 0 and practical["train"]["lr"] < 0.003
    demo = resolve_config(load_config("demo"), {"train": {"epochs": 3, "lr": None}})
    assert demo["train"]["epochs"] == 3 and demo["train"]["lr"] == load_config("demo")["train"]["lr"]  # None: not given
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 5\nmodel:\n  arch: vit_tiny\n")
    c = resolve_config(load_config(f))
    assert c["model"]["arch"] == "vit_tiny_patch16_224" and c["train"]["epochs"] == 5
    with pytest.raises(IPMNError, match="not found"):
        load_config(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------------ cache
def test_cache_hits_misses_keys_and_corruption(cases, tmp_path):
    from ipmn.cache import GridCache, standardize
    from ipmn.inputs import load_inputs
    from ipmn.preprocess import PreprocessConfig, prepare_case

    cfg = {"n4": False, "smoothing": "none"}
    cache = GridCache(cfg, ("t1", "t2"), tmp_path / "cache")
    c = cases[0]
    first = cache.get(c)
    assert cache.stats["misses"] == 1 and cache.stats["hits"] == 0
    again = cache.get(c)
    assert cache.stats["hits"] == 1 and np.array_equal(first.data, again.data)
    # cached raw grid + in-memory standardisation == the engine's prepare_case
    volumes, roi = load_inputs(c.t1, c.t2, c.roi, None, ("t1", "t2"))
    ref = prepare_case(volumes, roi, PreprocessConfig.from_dict(cfg), ("t1", "t2"))
    assert np.allclose(
        standardize(again.data, ("t1", "t2"), PreprocessConfig.from_dict(cfg)), ref.data, atol=1e-6
    )
    # a different filtering config is a different entry; a post-cache option (scale01) is not
    other = GridCache(
        {**cfg, "smoothing": "gradient", "smoothing_iterations": 1}, ("t1", "t2"), tmp_path / "cache"
    )
    assert other.key(c) != cache.key(c)
    assert GridCache({**cfg, "scale01": False}, ("t1", "t2"), tmp_path / "cache").key(c) == cache.key(c)
    # corruption: flipped bytes in the npz are detected and the entry rebuilt
    npz = next((tmp_path / "cache" / "grids").rglob("*.npz"))
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz.write_bytes(bytes(raw))
    rebuilt = cache.get(c)
    assert cache.stats["corrupt"] == 1 and cache.stats["misses"] == 2
    assert np.array_equal(rebuilt.data, first.data)
    # a missing sidecar (crash between the two writes) is also a rebuild
    next((tmp_path / "cache" / "grids").rglob("*.json")).unlink()
    cache.get(c)
    assert cache.stats["corrupt"] == 2
    # changed input contents → new key, even with the same size and mtime
    copy_t1 = tmp_path / "t1.nii.gz"
    copy_t1.write_bytes(Path(c.t1).read_bytes())
    st = os.stat(c.t1)
    moved = copy.copy(c)
    moved.t1 = copy_t1
    assert cache.key(moved) == cache.key(c)  # same contents, other path: same entry
    data = bytearray(copy_t1.read_bytes())
    data[-5] ^= 0x01
    copy_t1.write_bytes(bytes(data))
    os.utime(copy_t1, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.key(moved) != cache.key(c)


# ------------------------------------------------------------------------------------------------ samples
def test_window_reach_keeps_training_windows_near_the_centre():
    import numpy as np

    from ipmn.windows import case_starts

    arrays = [np.zeros((2, n, 4, 4), np.float32) for n in (9, 14, 25)]
    assert case_starts(arrays, 9, 1) == [[0], list(range(6)), list(range(17))]
    # central starts: 0, 2, 8 -> within 2 slices of them
    assert case_starts(arrays, 9, 1, reach=2) == [[0], [0, 1, 2, 3, 4], [6, 7, 8, 9, 10]]
    assert case_starts(arrays, 9, 4, reach=0) == [[0], [2], [8]]  # the central window even off-stride


def test_flips_only_training_never_turns_a_window():
    """train.quarter_turns: false maps the plan's turns to 0 or 2: every sample is the window, a flip of it
    or both flips, never turned (which would swap the 2.4 mm and 1.0 mm axes); with turns, rot 1 turns it."""
    import numpy as np
    import torch

    from ipmn.grid import tile
    from ipmn.windows import WindowDataset

    rng = np.random.default_rng(0)
    window = rng.random((2, 9, 8, 8)).astype(np.float32)  # no symmetry
    tiled = torch.from_numpy(tile(window))

    def views(x):  # x: (C, k, h, w) -> tiled
        return torch.from_numpy(np.ascontiguousarray(tile(x)))

    flipped = [views(window), views(window[..., ::-1]), views(window[..., ::-1, :]), views(window[..., ::-1, ::-1])]
    turned = views(np.rot90(window, 1, axes=(-2, -1)))
    flips_only = WindowDataset([window], [2], 9, 8, augment=True, quarter_turns=False)
    with_turns = WindowDataset([window], [2], 9, 8, augment=True, quarter_turns=True)
    plan = [(0, 0, f, r) for f in (0, 1) for r in range(4)]
    flips_only.plan = with_turns.plan = plan
    seen = set()
    for i, (_, _, f, r) in enumerate(plan):
        x, y = flips_only[i]
        assert y == 2
        matches = [j for j, v in enumerate(flipped) if torch.equal(x, v)]
        assert len(matches) == 1, (f, r)
        seen.add(matches[0])
        if r % 2:
            assert not any(torch.equal(with_turns[i][0], v) for v in flipped)  # the turned views differ
    assert seen == {0, 1, 2, 3}  # all four flips are drawn
    assert torch.equal(with_turns[1][0], turned) and torch.equal(flips_only[0][0], tiled)


def test_epoch_plan_is_a_function_of_seed_and_epoch():
    from ipmn.windows import epoch_plan

    starts = [list(range(8)), list(range(3)), list(range(12))]
    a = epoch_plan(starts, 4, seed=3, epoch=2)
    assert a == epoch_plan(starts, 4, seed=3, epoch=2)
    assert a != epoch_plan(starts, 4, seed=3, epoch=3)
    assert len(a) == 4 + 3 + 4
    assert {(ci, s) for ci, s, _, _ in epoch_plan(starts, None, 0, 1)} == {
        (i, s) for i, st in enumerate(starts) for s in st
    }
    ranks = [epoch_plan(starts, None, 0, 1, rank=r, world=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 12
    assert set(ranks[0] + ranks[1]) == set(epoch_plan(starts, None, 0, 1))


def test_class_weights_from_training_split_only():
    from ipmn.train import class_weight_vector

    w = class_weight_vector("balanced", np.array([10, 5, 0]))
    assert w.tolist() == [15 / (2 * 10), 15 / (2 * 5), 0.0]
    assert class_weight_vector("none", np.array([1, 2, 3])) is None
    assert class_weight_vector([1.0, 0.65, 0.45], np.array([1, 1, 1])).tolist() == [1.0, 0.65, 0.45]


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def reference_run(cases, cache_dir, tmp_path_factory):
    """An uninterrupted 3-epoch run (checkpoint kept) to compare interrupted runs against."""
    from ipmn.train import train_model

    train, val = _split(cases)
    out = tmp_path_factory.mktemp("reference")
    cfg = tiny(cache_dir, epochs=3, keep_checkpoint=True)
    summary = train_model(
        train,
        cfg,
        out / "work",
        val_cases=val,
        package_dir=out / "model",
        cohort_info={"synthetic": True, "source": "phantoms"},
    )
    return {"out": out, "cfg": cfg, "summary": summary, "train": train, "val": val}


def test_train_writes_a_complete_package(reference_run, cases):
    from ipmn.checkpoint import read_tensors
    from ipmn.models import load_package
    from ipmn.predict import Predictor
    from ipmn.train import class_weight_vector

    out, summary = reference_run["out"], reference_run["summary"]
    cfg = json.loads((out / "model" / "config.json").read_text())
    for key in (
        "arch",
        "modalities",
        "fusion",
        "k",
        "cell",
        "class_names",
        "preprocess",
        "weights_source",
        "training",
        "cohort",
        "validation",
        "card",
    ):
        assert key in cfg, key
    assert cfg["k"] == 9 and cfg["cell"] == 64 and cfg["depth"] == 2
    assert "not for clinical use" in cfg["card"] and "phantom" in cfg["card"]
    assert len(cfg["training"]["history"]) == 3 and cfg["training"]["selected_epoch"] == summary["best_epoch"]
    assert cfg["cohort"]["train"]["n_cases"] == len(reference_run["train"])
    # class weights: from the training windows only (3 per case and epoch here)
    counts = np.bincount([c.label for c in reference_run["train"]], minlength=3) * 3
    assert np.allclose(cfg["training"]["class_weights"], class_weight_vector("balanced", counts))
    # the package holds the best validation epoch's weights
    best_epoch = summary["best_epoch"]
    scores = [(h["val_balanced_accuracy"], -h["val_loss"]) for h in summary["history"]]
    assert best_epoch == 1 + max(range(3), key=lambda i: scores[i])
    ckpt, state = read_tensors(out / "work" / "checkpoint.safetensors")
    assert state["epoch"] == 3 and state["best"]["epoch"] == best_epoch
    model, _ = load_package(out / "model")
    assert model.num_classes == 3
    # the engine's predictor reads it back and gives the probabilities training's own evaluation gives
    from ipmn.cache import GridCache, standardize
    from ipmn.preprocess import PreprocessConfig
    from ipmn.windows import predict_cases

    c = reference_run["val"][0]
    result = Predictor(out / "model", device="cpu", precision="fp32").predict(c.t1, c.t2, c.roi, fidelity=False)
    pre = PreprocessConfig.from_dict(reference_run["cfg"]["preprocess"] | {"cell": 64})
    raw = GridCache(pre, ("t1", "t2"), reference_run["cfg"]["data"]["cache_dir"]).get(c).data
    ours = np.exp(
        predict_cases(
            model,
            [standardize(raw, ("t1", "t2"), pre)],
            9,
            "central",
            torch.device("cpu"),
            torch.autocast("cpu", enabled=False),
        )
    )[0]
    assert np.allclose(list(result["probabilities"].values()), ours, atol=1e-4)
    assert "synthetic phantom" in result["model"]["trained_on"]


_KILL_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from ipmn.cohort import load_cohort
    from ipmn.progress import Progress
    from ipmn.train import train_model

    class Slow(Progress):
        def epoch(self, epoch, *args, **kwargs):  # called right after the epoch's checkpoint is written
            print(f"EPOCH {epoch}", flush=True)
            time.sleep(60)

    cfg = json.loads(sys.argv[1])
    ids = json.loads(sys.argv[2])
    cases = {c.case_id: c for c in load_cohort(sys.argv[3])}
    train_model([cases[i] for i in ids["train"]], cfg, sys.argv[4], val_cases=[cases[i] for i in ids["val"]],
                package_dir=sys.argv[5], progress=Slow("none"), cohort_info={"synthetic": True, "source": "phantoms"})
""")


def test_kill_and_resume_gives_identical_weights(reference_run, cohort, tmp_path):
    from ipmn.checkpoint import read_tensors
    from ipmn.train import train_model

    script = tmp_path / "kill_me.py"
    script.write_text(_KILL_SCRIPT)
    work, pkg = tmp_path / "work", tmp_path / "model"
    ids = {
        "train": [c.case_id for c in reference_run["train"]],
        "val": [c.case_id for c in reference_run["val"]],
    }
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the same thread count as this process (one_thread)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            json.dumps(reference_run["cfg"]),
            json.dumps(ids),
            str(cohort),
            str(work),
            str(pkg),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "EPOCH 1", (line, proc.stderr.read() if proc.poll() is not None else "")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not pkg.exists()
    _, state = read_tensors(work / "checkpoint.safetensors")
    assert state["epoch"] == 1
    # without --resume the folder is refused; with it training continues at epoch 2
    with pytest.raises(IPMNError, match="--resume"):
        train_model(
            reference_run["train"],
            reference_run["cfg"],
            work,
            val_cases=reference_run["val"],
            package_dir=pkg,
        )
    summary = train_model(
        reference_run["train"],
        reference_run["cfg"],
        work,
        val_cases=reference_run["val"],
        package_dir=pkg,
        resume=True,
        cohort_info={"synthetic": True, "source": "phantoms"},
    )
    ref = reference_run["out"]
    assert [h["train_loss"] for h in summary["history"]] == [
        h["train_loss"] for h in reference_run["summary"]["history"]
    ]
    assert _same(_weights(pkg), _weights(ref / "model"))
    a, _ = read_tensors(work / "checkpoint.safetensors")
    b, _ = read_tensors(ref / "work" / "checkpoint.safetensors")
    assert _same(
        {k: v for k, v in a.items() if k.startswith(("model.", "optim."))},
        {k: v for k, v in b.items() if k.startswith(("model.", "optim."))},
    )


def test_disk_full_leaves_the_last_good_checkpoint(reference_run, tmp_path, monkeypatch):
    import safetensors.torch

    from ipmn.checkpoint import read_tensors
    from ipmn.train import train_model

    real = safetensors.torch.save_file
    calls = {"checkpoint": 0}

    def full_disk(tensors, filename, metadata=None):
        if ".checkpoint" in Path(filename).name:
            calls["checkpoint"] += 1
            if calls["checkpoint"] == 2:
                Path(filename).write_bytes(b"\0" * 1000)  # a partial write, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    work, pkg = tmp_path / "work", tmp_path / "model"
    args = (reference_run["train"], reference_run["cfg"], work)
    with pytest.raises(IPMNError, match="disk full"):
        train_model(*args, val_cases=reference_run["val"], package_dir=pkg)
    _, state = read_tensors(work / "checkpoint.safetensors")
    assert state["epoch"] == 1
    assert not [p for p in work.iterdir() if p.name.startswith(".")], list(work.iterdir())  # no temp files
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    train_model(
        *args,
        val_cases=reference_run["val"],
        package_dir=pkg,
        resume=True,
        cohort_info={"synthetic": True, "source": "phantoms"},
    )
    assert _same(_weights(pkg), _weights(reference_run["out"] / "model"))


def test_output_folder_policy(reference_run, cases, cache_dir, tmp_path):
    from ipmn.train import train_model

    train, val = reference_run["train"], reference_run["val"]
    work, pkg = reference_run["out"] / "work", reference_run["out"] / "model"
    # the same, finished run: --resume returns it without training again
    before = (pkg / "model.safetensors").stat().st_mtime_ns
    again = train_model(train, reference_run["cfg"], work, val_cases=val, package_dir=pkg, resume=True)
    assert again["finished"] and (pkg / "model.safetensors").stat().st_mtime_ns == before
    # a different run in the folder is refused, even with --resume
    other = tiny(cache_dir, epochs=1, lr=5e-4)
    for resume in (False, True):
        with pytest.raises(IPMNError, match="different"):
            train_model(train, other, work, val_cases=val, package_dir=pkg, resume=resume)
    # a package from another run is refused unless --overwrite
    with pytest.raises(IPMNError, match="--overwrite"):
        train_model(train, other, tmp_path / "w2", val_cases=val, package_dir=pkg)
    # a folder that is not ours is never overwritten
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    with pytest.raises(IPMNError, match="not a model package"):
        train_model(train, other, tmp_path / "w3", package_dir=foreign, overwrite=True)
    with pytest.raises(IPMNError, match="not an ipmn"):
        train_model(train, other, foreign, package_dir=tmp_path / "p4", overwrite=True)
    assert (foreign / "thesis.txt").read_text() == "precious"
    # --overwrite replaces our own run
    out = tmp_path / "ow"
    train_model(train[:9], other, out / "work", package_dir=out / "model")
    s = train_model(train, other, out / "work", package_dir=out / "model", overwrite=True)
    assert len(s["train_cases"]) == len(train)


def test_fewer_than_two_classes_and_overlap(cases, cache_dir, tmp_path):
    from ipmn.train import train_model

    normal = [c for c in cases if c.label == 0]
    with pytest.raises(IPMNError, match="fewer than two classes"):
        train_model(normal, tiny(cache_dir), tmp_path / "a")
    with pytest.raises(IPMNError, match="both"):
        train_model(cases[:8], tiny(cache_dir), tmp_path / "b", val_cases=cases[6:10])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _cli(argv):
    from ipmn import cli_train

    parser = argparse.ArgumentParser(prog="ipmn")
    cli_train.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_cli_train_jsonl_progress(cohort, cache_dir, tmp_path, capsys):
    import yaml

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny(cache_dir, epochs=2)))
    out = tmp_path / "pkg"
    assert (
        _cli(
            [
                "train",
                "--cohort",
                cohort,
                "--config",
                cfg,
                "--out",
                out,
                "--val-fraction",
                0.25,
                "--epochs",
                1,
                "--progress",
                "jsonl",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert len(epochs) == 1
    for key in ("fold", "epoch", "epochs", "train_loss", "val_loss", "val_acc", "eta_s"):
        assert key in epochs[0], key
    assert events[-1]["event"] == "done" and events[-1]["out"] == str(out)
    assert (out / "config.json").exists() and (tmp_path / "pkg.train" / "summary.json").exists()
    assert json.loads((out / "config.json").read_text())["cohort"]["synthetic"] is True
    # the same folder again: refused without a flag; --resume (no config needed) finds the run finished
    with pytest.raises(IPMNError, match="--resume"):
        _cli(["train", "--cohort", cohort, "--config", cfg, "--out", out, "--epochs", 1, "--val-fraction", 0.25,
              "--progress", "none"])
    with pytest.raises(IPMNError, match="different training run"):  # another validation split
        _cli(["train", "--cohort", cohort, "--config", cfg, "--out", out, "--epochs", 1, "--progress", "none"])
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert _cli(["train", "--cohort", cohort, "--out", out, "--resume", "--progress", "none"]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # bad input
    with pytest.raises(IPMNError, match="unknown case"):
        _cli(["train", "--cohort", cohort, "--config", cfg, "--out", tmp_path / "x", "--val-cases", "nosuch"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(IPMNError, match="epoch"):
        _cli(["train", "--cohort", cohort, "--config", bad, "--out", tmp_path / "y"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_tensorboard_curves_match_the_history_and_do_not_change_the_run(cohort, cache_dir, tmp_path):
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny(cache_dir, epochs=2)))
    out = tmp_path / "pkg"
    args = ["train", "--cohort", cohort, "--config", cfg, "--out", out, "--val-fraction", 0.25, "--progress", "none",
            "--device", "cpu"]
    assert _cli([*args, "--tensorboard"]) == 0
    work = tmp_path / "pkg.train"
    history = json.loads((work / "history.json").read_text())["history"]
    events = EventAccumulator(str(work / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/validation", "validation/balanced_accuracy", "optimizer/lr"} <= tags
    for key, tag in (("train_loss", "loss/train"), ("val_loss", "loss/validation"), ("lr", "optimizer/lr")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [step for step, _ in logged] == [1, 2]
        np.testing.assert_allclose([v for _, v in logged], [h[key] for h in history], rtol=1e-6)
    # logging is not part of the run's identity: the finished run is found with the flag off
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert _cli([*args, "--resume"]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_tensorboard_missing_is_one_clear_error(cohort, cache_dir, tmp_path, monkeypatch):
    import yaml

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny(cache_dir, epochs=1, tensorboard=True)))
    with pytest.raises(IPMNError, match="pip install tensorboard"):
        _cli(["train", "--cohort", cohort, "--config", cfg, "--out", tmp_path / "pkg", "--progress", "none"])
    assert not (tmp_path / "pkg").exists()


_DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from ipmn.cohort import load_cohort
    from ipmn.device import dist_info
    from ipmn.train import train_model

    cfg = json.loads(sys.argv[1])
    ids = json.loads(sys.argv[2])
    cases = {c.case_id: c for c in load_cohort(sys.argv[3])}
    s = train_model([cases[i] for i in ids["train"]], cfg, sys.argv[4], val_cases=[cases[i] for i in ids["val"]],
                    package_dir=sys.argv[5])
    rank, world, _ = dist_info()
    # one file per rank: torchrun merges the ranks' stdout without keeping their lines apart
    with open(f"{sys.argv[6]}/result{rank}.json", "w") as fh:
        json.dump({"rank": rank, "world": world,
                   "history": [[h["train_loss"], h["val_loss"]] for h in s["history"]]}, fh)
""")


def test_ddp_two_cpu_processes(reference_run, cohort, tmp_path):
    """torchrun, 2 processes, gloo: ranks stay in sync and only rank 0 writes."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    train, val = reference_run["train"][:9], reference_run["val"]
    ids = {"train": [c.case_id for c in train], "val": [c.case_id for c in val]}
    cfg = copy.deepcopy(reference_run["cfg"])
    cfg["train"].update(epochs=1, keep_checkpoint=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            json.dumps(cfg),
            json.dumps(ids),
            str(cohort),
            str(tmp_path / "work"),
            str(tmp_path / "model"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1] and all(r["world"] == 2 for r in results)
    assert (
        results[0]["history"] == results[1]["history"]
    )  # same all-reduced loss, same validation → same weights
    pkg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert pkg["training"]["world_size"] == 2
    assert time.time() - t < 240


@pytest.mark.parametrize("cfg", [
    {"arch": "vit_tiny_patch16_224", "depth": 1, "embed_dim": 48, "num_heads": 3, "reg_tokens": 2},
    {"arch": "vit_tiny_patch16_224", "depth": 1, "embed_dim": 48, "num_heads": 3, "fusion": "late"},
])
def test_weight_decay_skips_every_token_and_embedding(cfg):
    """Tokens, position embeddings, biases and norms get no weight decay; weight matrices do (AdamW)."""
    from ipmn.models import build_model
    from ipmn.train import make_optimizer

    model = build_model(cfg)
    opt = make_optimizer(model, {"optimizer": "adamw", "weight_decay": 0.05}, 1e-3)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(decay_of) == len(names)  # every parameter in exactly one group
    tokens = [n for n in names if n.rsplit(".", 1)[-1] in ("pos_embed", "cls_token", "reg_token")]
    assert tokens and all(decay_of[id(names[n])] == 0.0 for n in tokens), tokens
    weights = [n for n, p in names.items() if p.ndim == 2 and n.endswith("weight")]
    assert weights and all(decay_of[id(names[n])] == 0.05 for n in weights)


# ------------------------------------------------------------------------------------------------ distillation
def test_distillation_teacher_is_trained_on_the_same_training_split(cases, cache_dir, tmp_path):
    from ipmn.models import load_package
    from ipmn.train import train_model

    train, val = _split(cases)
    cfg = tiny(cache_dir, epochs=1, teacher_arch="smallcnn", teacher_epochs=1)
    summary = train_model(train, cfg, tmp_path / "work", val_cases=val, package_dir=tmp_path / "model")
    teacher_dir = tmp_path / "work" / "teacher"
    taught = json.loads((teacher_dir / "summary.json").read_text())
    # the teacher saw exactly the student's training cases: no validation (or, in CV, test) case leaks in
    assert taught["train_cases"] == summary["train_cases"] == [c.case_id for c in train]
    assert taught["val_cases"] == [c.case_id for c in val]
    teacher, tcfg = load_package(teacher_dir / "model")
    student_cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert tcfg["arch"] == "smallcnn" and type(teacher).__name__ == "SmallCNN"
    assert tcfg["preprocess"] == student_cfg["preprocess"] and tcfg["k"] == student_cfg["k"]
    # a resumed (finished) run neither retrains the teacher nor the student
    stamp = (teacher_dir / "summary.json").stat().st_mtime_ns
    again = train_model(train, cfg, tmp_path / "work", val_cases=val, package_dir=tmp_path / "model", resume=True)
    assert again["fingerprint"] == summary["fingerprint"]
    assert (teacher_dir / "summary.json").stat().st_mtime_ns == stamp


class _Always(torch.nn.Module):
    """A stand-in teacher that answers one class whatever it sees."""

    def __init__(self, label: int):
        super().__init__()
        self.label = label

    def forward(self, x):
        out = torch.zeros(len(x), 3)
        out[:, self.label] = 10.0
        return out


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_distillation_loss_follows_the_teacher(cases, cache_dir, tmp_path, monkeypatch, alpha):
    # Planted teacher: it always says "high risk". With distill_alpha 1 the student learns only from it and
    # must end up saying "high" for (nearly) everything; with 0 the labels alone teach it (ablation).
    from ipmn.models import load_package
    from ipmn.train import Trainer, train_model
    from ipmn.windows import predict_cases

    def planted(self):
        self.teacher = _Always(2)

    monkeypatch.setattr(Trainer, "teach", planted)
    train, val = _split(cases)
    cfg = tiny(cache_dir, epochs=2, lr=2e-3, teacher_arch="smallcnn", distill_alpha=alpha, class_weights="none")
    train_model(train, cfg, tmp_path / "work", package_dir=tmp_path / "model")
    net, mcfg = load_package(tmp_path / "model")
    from ipmn.config import resolve_config
    from ipmn.windows import load_grids, prepare_arrays

    rcfg = resolve_config(cfg)
    grids = load_grids(train, rcfg)
    arrays = prepare_arrays(train, grids, rcfg, None)
    probs = predict_cases(net.eval(), [arrays[c.case_id] for c in train], mcfg["k"], "central", torch.device("cpu"),
                          torch.autocast("cpu", enabled=False))
    share_high = float(np.mean(np.asarray(probs).argmax(1) == 2))
    if alpha == 1.0:
        assert share_high >= 0.9, share_high
    else:
        assert share_high <= 0.75, share_high  # a third of the training cases are high risk


@pytest.mark.parametrize("temperature", [None, 2.0])
def test_soft_distillation_learns_the_teachers_beliefs_hard_its_decision(temperature):
    # Planted teacher with a clear second choice (logits 2, 1, -3). A student that learns from the
    # distillation term alone ends with the teacher's softened distribution when soft
    # (train.distill_temperature), and with the teacher's class only, near one-hot, when hard.
    import contextlib

    from ipmn.train import Trainer

    class Graded(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[2.0, 1.0, -3.0]]).expand(len(x), 3)

    trainer = object.__new__(Trainer)
    trainer.teacher, trainer.amp_ctx = Graded(), contextlib.nullcontext()
    trainer.tcfg = {"distill_alpha": 1.0, "distill_temperature": temperature}
    logits = torch.zeros(4, 3, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=1.0)
    for _ in range(500):
        opt.zero_grad()
        trainer._distill_loss(torch.zeros(4, 1), logits).backward()
        opt.step()
    t = 1.0 if temperature is None else temperature
    got = torch.softmax(logits.detach()[0] / t, 0)
    if temperature is None:
        assert got[0] > 0.97  # only the decision was taught
    else:
        want = torch.softmax(torch.tensor([2.0, 1.0, -3.0]) / t, 0)
        assert torch.allclose(got, want, atol=0.01), (got, want)  # the teacher's beliefs, second choice kept
        assert 0.3 < got[1] < 0.4
