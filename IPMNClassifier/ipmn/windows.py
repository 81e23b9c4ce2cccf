"""Training and evaluation samples: a case's ROI grid → standardised arrays → k-slice windows.

* :func:`load_grids` / :func:`prepare_arrays` — cached preprocessed grids (:mod:`ipmn.cache`) →
  standardised ``(C, S, cell, cell)`` arrays, with Nyúl landmarks from :func:`landmarks_for` (fitted on
  the training cases only).
* :func:`epoch_plan` / :class:`WindowDataset` — every sliding window of ``k`` consecutive slices of every
  training case (``train.window_stride``, ``train.window_reach``; ``train.windows_per_case`` caps how many per case and epoch,
  drawn afresh each epoch), shuffled, each with its augmentation (:mod:`ipmn.augment`) drawn from
  ``(seed, epoch)`` alone so that a resumed run sees the same samples.
* :func:`predict_cases` — per-case class probabilities from the central window or all windows
  (validation, CV test folds).
"""

from __future__ import annotations

import numpy as np

from ipmn.errors import IPMNError


def prepare_arrays(cases, grids: dict, cfg: dict, landmarks: dict | None) -> dict:
    """case_id → standardised (C, S, cell, cell) float32, padded to ≥ k slices when data.pad is set."""
    from ipmn.cache import standardize
    from ipmn.config import PreprocessConfig
    from ipmn.grid import pad_slices

    pre = PreprocessConfig.from_dict(cfg["preprocess"])
    k = cfg["model"]["k"]
    mods = cfg["model"]["modalities"]
    short = [f"{c.case_id} ({grids[c.case_id].n_slices})" for c in cases if grids[c.case_id].n_slices < k]
    if short and not cfg["data"]["pad"]:
        raise IPMNError(
            f"{len(short)} case(s) have fewer ROI slices than k={k}: {', '.join(short[:10])}; enlarge their ROIs, "
            "lower model.k, or set data.pad: true to replicate the last slice"
        )
    out = {}
    for c in cases:
        arr = standardize(grids[c.case_id].data, mods, pre, landmarks)
        out[c.case_id] = pad_slices(arr, k) if arr.shape[1] < k else arr
    return out


def load_grids(cases, cfg: dict, progress=None, cache_dir=None) -> dict:
    from ipmn.cache import GridCache

    cache = GridCache(cfg["preprocess"], cfg["model"]["modalities"], cache_dir or cfg["data"]["cache_dir"],
                      cfg["data"]["roi_margin_mm"], cfg["data"]["nonfinite"])
    return cache.get_many(cases, progress=progress)


def landmarks_for(train_cases, grids: dict, cfg: dict) -> dict | None:
    """Nyúl landmarks learned on the training cases only (None unless preprocess.standardize is nyul)."""
    if cfg["preprocess"]["standardize"] != "nyul":
        return None
    from ipmn.cache import fit_landmarks

    return fit_landmarks([grids[c.case_id].data for c in train_cases], cfg["model"]["modalities"])


class WindowDataset:
    """Tiled training windows for one epoch's plan of ``(case index, start, hflip, quarter turns)``;
    the flip and turns act on the untiled window (:func:`ipmn.augment.augment_window`). Without
    ``quarter_turns`` the plan's turns become 0 or 2 (``train.quarter_turns``: flips only, same plan).
    With ``lesions`` a sample also carries its tiled lesion labels (1, H, W), transformed as the image,
    and 1/0 for "has a mask" (``train.lesion_loss``)."""

    def __init__(self, arrays: list, labels: list, k: int, cell: int, augment: bool, quarter_turns: bool = True,
                 lesions: list | None = None):
        self.arrays, self.labels, self.k, self.cell, self.augment = arrays, labels, k, cell, augment
        self.quarter_turns = quarter_turns
        self.lesions = lesions  # per case (S, cell, cell) lesion labels or None (ipmn.lesionloss)
        self.plan: list = []

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, i):
        import torch

        from ipmn.augment import augment_window
        from ipmn.grid import tile

        ci, start, flip, rot = self.plan[i]
        rot = int(rot) if self.quarter_turns else 2 * (int(rot) % 2)
        window = self.arrays[ci][:, start : start + self.k]
        if self.augment:
            window = augment_window(window, bool(flip), rot)
        sample = torch.from_numpy(np.ascontiguousarray(tile(window))), int(self.labels[ci])
        if self.lesions is None:
            return sample
        les = self.lesions[ci]
        if les is None:  # no mask: zeros, and the loss skips it
            return (*sample, torch.zeros((1, *sample[0].shape[-2:]), dtype=torch.uint8), 0)
        les = les[None, start : start + self.k]
        if self.augment:
            les = augment_window(les, bool(flip), rot)
        return (*sample, torch.from_numpy(np.ascontiguousarray(tile(les))), 1)


def case_starts(arrays: list, k: int, stride: int, reach: int | None = None) -> list[list[int]]:
    """Each case's training window starts: every ``stride``-th one, or only those within ``reach`` slices
    of the central window (``train.window_reach``; the central window itself is always one of them)."""
    from ipmn.grid import central_start, window_starts

    out = []
    for a in arrays:
        starts = window_starts(a.shape[1], k, stride)
        if reach is not None and starts:
            mid = central_start(a.shape[1], k)
            starts = sorted({s for s in starts if abs(s - mid) <= reach} | {mid})
        out.append(starts)
    return out


def per_epoch_counts(starts: list[list[int]], cap: int | None) -> list[int]:
    return [len(s) if cap is None else min(cap, len(s)) for s in starts]


def epoch_plan(starts: list[list[int]], cap: int | None, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list:
    """The (shuffled) samples of ``epoch``: a function of (seed, epoch) only; rank r takes items r::world."""
    rng = np.random.default_rng([int(seed) % 2**32, int(epoch), 0x1B3])
    items = []
    for ci, s in enumerate(starts):
        chosen = s if cap is None or len(s) <= cap else sorted(rng.choice(s, size=cap, replace=False).tolist())
        items.extend((ci, int(x)) for x in chosen)
    order = rng.permutation(len(items))
    flips = rng.integers(0, 2, len(items))
    rots = rng.integers(0, 4, len(items))
    plan = [(items[j][0], items[j][1], int(flips[i]), int(rots[i])) for i, j in enumerate(order)]
    if world > 1:
        pad = (-len(plan)) % world
        plan = plan + plan[:pad]
        plan = plan[rank::world]
    return plan


def predict_cases(net, arrays: list, k: int, windows: str, device, amp_ctx, batch_size: int = 16,
                  stride: int = 1) -> np.ndarray:
    """Per-case log of the window-averaged class probabilities, shape (n_cases, n_classes)."""
    import torch

    from ipmn.grid import case_windows

    was_training = net.training
    net.eval()
    out = []
    with torch.no_grad():
        for arr in arrays:
            _, w = case_windows(arr, k, windows, stride, pad=True)
            probs = []
            for i in range(0, len(w), batch_size):
                x = torch.from_numpy(w[i : i + batch_size]).to(device)
                with amp_ctx:
                    logits = net(x)
                probs.append(torch.softmax(logits.float(), dim=-1).cpu())
            p = torch.cat(probs).mean(0).numpy().astype(np.float64)
            out.append(np.log(np.clip(p, 1e-12, 1.0)))
    net.train(was_training)
    return np.stack(out) if out else np.zeros((0, 0))
