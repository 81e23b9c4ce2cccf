"""Training one model on a cohort (``ipmn train``), also used for every fold of ``ipmn cv``.

Samples (paper, section IV-B): every window of ``k`` consecutive ROI slices of every training case
(sliding, stride ``train.window_stride``), tiled into a √k × √k grid and labelled with its case's label;
``train.windows_per_case`` caps how many of a case's windows are drawn per epoch (drawn afresh each
epoch; 1 = the reference code's "random start slice"). Validation uses the central window, or every
window with the class probabilities averaged per case (``train.val_windows: all``).

Augmentation (paper): per sample a random horizontal flip and a random number of quarter turns,
applied identically to every slice and channel of the untiled window (:mod:`ipmn.augment`; a plain
flip/rotation of the tiled image would move slices between cells). Samples: :mod:`ipmn.windows`.

Determinism and resuming: all sampling, shuffling and augmentation of epoch ``e`` come from generators
seeded with ``(seed, e)``; dropout uses torch's global generator, whose state is checkpointed. After
every epoch a checkpoint (model, optimiser, LR schedule, grad scaler, RNG states, history) is written
atomically as ONE ``.safetensors`` file whose header metadata holds the JSON state (no pickle); a
killed run resumed with ``resume=True`` reaches bit-identical weights on CPU with the same seed and
thread count. Best-epoch selection uses the validation split only; without one, the last epoch (or
``stop_epoch``, chosen by nested CV on inner folds) is kept. Class weights come from the training
split only.

Multi-GPU: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised (NCCL on CUDA,
gloo on CPU), the model is wrapped in DistributedDataParallel and each rank takes every
``world_size``-th sample of the epoch's plan (the global batch is ``batch_size × world_size``); every
rank evaluates the full validation set (identical weights → identical decisions, no broadcast) and only
rank 0 writes files.

Working files of a run live in ``out_dir`` (``run.json``, ``checkpoint.safetensors``,
``history.json``, ``summary.json``; folder rules in :mod:`ipmn.runs`, checkpoint format in
:mod:`ipmn.checkpoint`); the model package is written with ``ipmn.models.save_package`` to
``package_dir`` (default ``out_dir/model``).

The loop is :class:`Trainer`: ``prepare`` (config, cases, run folder) → ``load_data`` → ``build``
(model, optimiser, schedule, loss) → ``resume`` → per epoch ``run_epoch`` + ``validate`` +
``save_checkpoint`` → ``finish`` (selected weights, model package, summary). About 670 lines: the loop's
steps and the pieces only it uses (class weights, optimiser, schedule, model card, distillation teacher)
stay together. With ``train.lesion_loss`` the optimiser and checkpoints hold the net plus its training-only
lesion head (``Trainer.trainable``, :mod:`ipmn.lesionloss`); validation, best weights and the package
use the net alone.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from ipmn.config import is_resolved, resolve_config
from ipmn.device import autocast_for, dist_info, resolve_device
from ipmn.errors import IPMNError
from ipmn.io import write_json

TENSORBOARD_SCALARS = (
    ("train_loss", "loss/train"), ("val_loss", "loss/validation"), ("val_acc", "validation/accuracy"),
    ("val_balanced_accuracy", "validation/balanced_accuracy"), ("val_macro_auc", "validation/macro_auc"),
    ("val_macro_f1", "validation/macro_f1"), ("lr", "optimizer/lr"), ("samples_per_s", "speed/samples_per_s"),
    ("data_wait_s", "speed/data_wait_s"),
)


# ------------------------------------------------------------------------------------------------ pieces
def seed_everything(seed: int, deterministic: bool = True) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def class_weight_vector(spec, counts: np.ndarray) -> np.ndarray | None:
    """Loss weights from the per-class training-sample counts (``balanced``: n / (C · n_c); absent class → 0)."""
    if spec == "none":
        return None
    if isinstance(spec, list):
        return np.asarray(spec, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def _param_groups(model, weight_decay: float):
    """timm's weight-decay groups: no decay for biases, norms and the tokens/embeddings the model names in
    ``no_weight_decay()`` (ViTs: pos_embed, cls_token, reg_token, dist_token; late fusion: each branch's)."""
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


def make_optimizer(model, t: dict, lr: float):
    import torch

    groups = _param_groups(model, float(t["weight_decay"]))
    if t["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if t["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=float(t["momentum"]))


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, floor: float) -> float:
    """Linear warm-up then cosine decay to ``floor`` (or constant); a function of the step only."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "none":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise IPMNError("train.tensorboard (--tensorboard) needs the tensorboard package: pip install tensorboard") from exc
    return SummaryWriter


def _score(metrics: dict, loss: float, name: str) -> tuple:
    """Higher is better; ties on the metric are broken by the lower validation loss."""
    if name == "loss":
        return (-loss, 0.0)
    v = metrics.get(name)
    v = v if v is not None and math.isfinite(v) else -1.0
    return (v, -loss)


def _card(cohort_info: dict | None, n_train: int, mcfg: dict) -> str:
    info = cohort_info or {}
    what = "synthetic phantom cases" if info.get("synthetic") else "cases"
    text = f"{mcfg['arch']} ({'+'.join(m.upper() for m in mcfg['modalities'])}, {mcfg['fusion']} fusion) trained on {n_train} {what}"
    if info.get("source"):
        text += f" from {info['source']}"
    text += ". Research use only; not a medical device and not for clinical use."
    if info.get("synthetic"):
        text += (" Trained on synthetic phantoms whose labels follow guideline rules: much easier than real IPMN"
                 " grading, so its numbers say nothing about clinical performance.")
    return text


def teacher_config(cfg: dict) -> dict:
    """The resolved config of a run's distillation teacher: ``train.teacher_arch`` on the student's inputs
    (modalities, k, cell, preprocessing, data), trained as the student is but for ``teacher_epochs``."""
    m, t = cfg["model"], cfg["train"]
    return resolve_config({
        "model": {"arch": t["teacher_arch"], "pretrained": None, "modalities": m["modalities"], "k": m["k"],
                  "cell": m["cell"], "num_classes": m["num_classes"], "class_names": m["class_names"]},
        "preprocess": cfg["preprocess"], "data": cfg["data"], "cv": cfg["cv"],
        "train": {**t, "teacher_arch": None, "epochs": t["teacher_epochs"] or t["epochs"],
                  "save_dtype": "float32", "tensorboard": False},
    })


# ------------------------------------------------------------------------------------------------ entry point
def train_model(cases, config, out_dir, val_cases=None, device="cpu", progress=None, resume=False, *,
                package_dir=None, stop_epoch: int | None = None, grids: dict | None = None,
                cohort_info: dict | None = None, keep_val_logits: bool = False, overwrite: bool = False,
                package_extra: dict | None = None) -> dict:
    """Train one model; returns a summary dict (history, best epoch, validation metrics, package path).

    ``config``: a raw config dict (sections model/preprocess/train/cv/data) or a resolved one.
    ``out_dir``: working folder (checkpoint, history, summary). ``package_dir``: where the model package
    goes (default ``out_dir/model``; ``False`` = no package, e.g. for inner CV folds). ``stop_epoch``:
    stop after this epoch (the LR schedule still spans ``train.epochs``, as in the inner folds that chose
    it). ``grids``: preloaded cache entries (case_id → CachedGrid). ``resume``: continue from the last
    checkpoint; a finished run is returned as it is. ``keep_val_logits``: record per-epoch validation
    log-probabilities in the history (nested CV uses them for temperature scaling). ``package_extra``:
    more entries for the package's config.json (nested CV: the ``calibration`` fitted on inner folds).
    """
    import torch

    det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        trainer = Trainer(cases, config, out_dir, val_cases, device, progress, package_dir=package_dir,
                          stop_epoch=stop_epoch, cohort_info=cohort_info, keep_val_logits=keep_val_logits,
                          package_extra=package_extra)
        done = trainer.prepare(resume, overwrite)
        if done is not None:
            return done
        try:
            trainer.load_data(grids)
            trainer.teach()
            trainer.build()
            if resume:
                trainer.resume()
            return trainer.commit(trainer.fit())
        except BaseException:
            trainer.abandon()
            raise
    finally:  # deterministic mode is process-wide: give the caller back its own setting
        torch.use_deterministic_algorithms(det[0], warn_only=det[1])


# ------------------------------------------------------------------------------------------------ the loop
class Trainer:
    """One training run as named steps; :func:`train_model` calls them in order."""

    def __init__(self, cases, config, out_dir, val_cases=None, device="cpu", progress=None, *, package_dir=None,
                 stop_epoch: int | None = None, cohort_info: dict | None = None, keep_val_logits: bool = False,
                 package_extra: dict | None = None):
        from ipmn.progress import Progress

        self.cfg = config if is_resolved(config) else resolve_config(config)
        self.mcfg, self.tcfg = self.cfg["model"], self.cfg["train"]
        # refuse a missing tensorboard before any work
        self.summary_writer = _summary_writer_class() if self.tcfg["tensorboard"] else None
        self.progress = progress or Progress("none")
        self.out_dir = Path(out_dir)
        self.final_dir: Path | None = None  # set while an --overwrite run is built beside the old one
        self.package_dir = (self.out_dir / "model") if package_dir is None else (Path(package_dir) if package_dir else None)
        self.cases, self.val_cases = list(cases), list(val_cases or [])
        self.cohort_info = cohort_info
        self.keep_val_logits = keep_val_logits
        self.package_extra = dict(package_extra or {})
        self.rank, self.world, self.local_rank = dist_info()
        self.is_main = self.rank == 0
        self.ddp = self.world > 1
        if not self.is_main:
            self.progress = Progress("none")
        self.epochs = int(self.tcfg["epochs"])
        self.stop_epoch = stop_epoch
        self.last_epoch = min(self.epochs, int(stop_epoch)) if stop_epoch else self.epochs
        self.device_spec = device
        self.history: list[dict] = []
        self.best = {"epoch": None, "score": None, "metrics": None, "val_loss": None}
        self.start_epoch = 1
        self.teacher = None  # the distillation teacher (:meth:`teach`)

    # -------------------------------------------------------------------------------- prepare
    def prepare(self, resume: bool, overwrite: bool) -> dict | None:
        """Check cases and settings, set up torch.distributed, claim the run folder (see :mod:`ipmn.runs`).
        Returns the stored summary when the same run already finished."""
        import torch

        from ipmn.runs import check_train_folder, overwrite_staging, start_train_folder, train_identity
        from ipmn.splits import check_labels

        cases, val_cases = self.cases, self.val_cases
        if not cases:
            raise IPMNError("no training cases")
        check_labels(cases, self.mcfg["num_classes"])
        if self.tcfg["lesion_loss"]:
            from ipmn.lesionloss import check_masks

            check_masks(cases)
        overlap = {c.case_id for c in cases} & {c.case_id for c in val_cases}
        if overlap:
            raise IPMNError(f"case(s) {sorted(overlap)[:5]} are in both the training and the validation set")
        overlap_p = {c.patient_id for c in cases} & {c.patient_id for c in val_cases}
        if overlap_p:
            raise IPMNError(f"patient(s) {sorted(overlap_p)[:5]} have cases in both training and validation")
        identity = train_identity(self.cfg, cases, val_cases, self.last_epoch)
        self.fingerprint = identity["fingerprint"]

        # distributed set-up before any file is written, so that every rank sees the same folder
        self.dev = resolve_device(self.device_spec, self.local_rank)
        if self.ddp:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.dev.type == "cuda" else "gloo")
            if self.dev.type == "cuda":
                torch.cuda.set_device(self.dev)
        # the folder: new, the same run (resume), or refused; decided read-only by every rank
        wipe, done = check_train_folder(self.out_dir, self.package_dir, self.fingerprint, resume, overwrite)
        if done is not None:
            self.progress.stage("train", f"already finished: {self.out_dir}")
            return done
        if wipe:  # --overwrite: the new run is built beside the old one and swapped in on success
            self.final_dir = self.out_dir
            self.out_dir = overwrite_staging(self.final_dir, clean=self.is_main)
            if self.package_dir and self.package_dir.is_relative_to(self.final_dir):
                self.package_dir = self.out_dir / self.package_dir.relative_to(self.final_dir)
        self._barrier()
        if self.is_main:
            start_train_folder(self.out_dir, identity, cases, val_cases)
        self._barrier()
        return None

    def commit(self, summary: dict) -> dict:
        """An ``--overwrite`` run that finished takes the place of the run it replaces."""
        from ipmn.runs import SUMMARY_FILE, commit_overwrite

        if self.final_dir is None:
            return summary
        staging, self.out_dir = self.out_dir, self.final_dir
        if self.package_dir and self.package_dir.is_relative_to(staging):
            self.package_dir = self.final_dir / self.package_dir.relative_to(staging)
            summary["package"] = str(self.package_dir)
            if self.is_main:
                write_json(summary, staging / SUMMARY_FILE)
        if self.is_main:
            commit_overwrite(staging, self.final_dir)
        self._barrier()
        self.final_dir = None
        return summary

    def abandon(self) -> None:
        """A failed ``--overwrite`` run: its staging folder goes, the old run stays as it was."""
        if self.final_dir is not None and self.is_main:
            import shutil

            shutil.rmtree(self.out_dir, ignore_errors=True)

    def _barrier(self) -> None:
        if self.ddp:
            import torch.distributed as dist

            dist.barrier()

    # -------------------------------------------------------------------------------- data
    def load_data(self, grids: dict | None = None) -> None:
        """Cached grids → standardised arrays (landmarks from the training cases only), epoch sizes, class weights."""
        from ipmn.windows import case_starts, landmarks_for, load_grids, per_epoch_counts, prepare_arrays

        t, cases, val_cases = self.tcfg, self.cases, self.val_cases
        self.seed = int(t["seed"])
        seed_everything(self.seed, t["deterministic"])
        if grids is None:
            grids = load_grids(cases + val_cases, self.cfg, self.progress)
        self.grids = grids
        self.landmarks = landmarks_for(cases, grids, self.cfg)
        arrays_by_id = prepare_arrays(cases + val_cases, grids, self.cfg, self.landmarks)
        self.train_arrays = [arrays_by_id[c.case_id] for c in cases]
        self.train_labels = [c.label for c in cases]
        self.val_arrays = [arrays_by_id[c.case_id] for c in val_cases]
        self.val_y = np.array([c.label for c in val_cases], dtype=int)
        self.train_lesions = None
        if t["lesion_loss"]:
            from ipmn.lesionloss import lesion_grids

            self.train_lesions = lesion_grids(cases, grids, self.mcfg["k"])
        self.starts = case_starts(self.train_arrays, self.mcfg["k"], t["window_stride"], t["window_reach"])
        per_case = per_epoch_counts(self.starts, t["windows_per_case"])
        counts = np.bincount(np.repeat(self.train_labels, per_case), minlength=self.mcfg["num_classes"])
        self.weights = class_weight_vector(t["class_weights"], counts)
        self.n_items = int(sum(per_case))
        self.steps_per_epoch = math.ceil(math.ceil(self.n_items / self.world) / t["batch_size"])

    def teach(self) -> None:
        """Distillation (``train.teacher_arch``): train the CNN teacher on this run's own training split
        (validation split and grids shared, so nested CV stays leak-free), in ``<run>/teacher``; a resumed
        run reloads the finished teacher instead of training it again."""
        self.teacher = None
        if not self.tcfg["teacher_arch"]:
            return
        from ipmn.models import load_package

        folder = self.out_dir / "teacher"
        tcfg = teacher_config(self.cfg)
        self.progress.stage("train", f"distillation: training the {tcfg['model']['arch']} teacher first "
                            f"({tcfg['train']['epochs']} epochs, the same {len(self.cases)} training case(s))")
        train_model(self.cases, tcfg, folder, self.val_cases, self.device_spec, self.progress, resume=True,
                    grids=self.grids, cohort_info=self.cohort_info)
        teacher, _ = load_package(folder / "model", device=self.dev)
        self.teacher = teacher.eval().requires_grad_(False)

    # -------------------------------------------------------------------------------- model
    def build(self) -> None:
        """Model (init consumes the seeded RNG identically on resume), optimiser, LR schedule, precision, loss."""
        import torch

        from ipmn.models import build_model
        from ipmn.windows import WindowDataset

        t = self.tcfg
        torch.manual_seed(self.seed)
        self.net = build_model(self.mcfg).to(self.dev)
        self.trainable = self.net  # what is optimised and checkpointed: the net, plus the lesion head if any
        if self.train_lesions is not None:
            from ipmn.lesionloss import WithLesionHead, label_weights, n_labels

            labels = n_labels(self.train_lesions)
            self.trainable = WithLesionHead(self.net, labels, self.mcfg["img_size"], len(self.mcfg["modalities"]))
            self.lesion_weights = label_weights(self.train_lesions, self.mcfg["k"], self.trainable.map_size, labels)
        self.model = self.trainable
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.trainable,
                                                 device_ids=[self.dev.index] if self.dev.type == "cuda" else None)
        self.lr = float(t["lr"])
        self.optimizer = make_optimizer(self.trainable, t, self.lr)
        total_steps = self.steps_per_epoch * self.epochs
        warmup_steps = self.steps_per_epoch * int(t["warmup_epochs"])
        floor = float(t["min_lr_ratio"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, t["schedule"], floor))
        self.amp_ctx, self.amp_used = autocast_for(t["amp"], self.dev)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_used == "fp16" else None
        weight = None if self.weights is None else torch.tensor(self.weights, dtype=torch.float32, device=self.dev)
        self.loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=float(t["label_smoothing"]))
        self.dataset = WindowDataset(self.train_arrays, self.train_labels, self.mcfg["k"], self.mcfg["cell"],
                                     t["augment"], t["quarter_turns"], self.train_lesions)

    def resume(self) -> None:
        """Continue from the run's last checkpoint, if there is one."""
        from ipmn.checkpoint import CHECKPOINT, load_checkpoint

        ckpt = self.out_dir / CHECKPOINT
        if not ckpt.exists():
            return
        state = load_checkpoint(ckpt, self.fingerprint, self.trainable, self.optimizer, self.scheduler, self.scaler)
        self.history, self.best = state["history"], state["best"]
        self.start_epoch = int(state["epoch"]) + 1
        self.progress.stage("train", f"resuming after epoch {state['epoch']} from {ckpt}", epoch=state["epoch"])

    # -------------------------------------------------------------------------------- epochs
    def fit(self) -> dict:
        from ipmn.progress import EtaClock

        self.progress.stage(
            "train", f"{len(self.cases)} training case(s), {self.n_items} window(s)/epoch, {len(self.val_cases)} "
            f"validation case(s), epochs {self.start_epoch}-{self.last_epoch} on {self.dev}"
            + (f" x{self.world}" if self.ddp else ""),
            n_train=len(self.cases), n_val=len(self.val_cases), windows=self.n_items)
        clock = EtaClock()
        tb = self.summary_writer(str(self.out_dir / "tensorboard")) if (self.summary_writer and self.is_main) else None
        self.t_start = time.perf_counter()
        self.stopped_early = False
        epoch = self.start_epoch - 1
        for epoch in range(self.start_epoch, self.last_epoch + 1):
            epoch_began = time.perf_counter()
            entry = self.run_epoch(epoch)
            improved = self.validate(entry) if self.val_cases else False
            entry["time_s"] = round(time.perf_counter() - epoch_began, 3)
            self.history.append(entry)
            if tb is not None:
                for key, tag in TENSORBOARD_SCALARS:
                    if entry.get(key) is not None:
                        tb.add_scalar(tag, entry[key], epoch)
                tb.flush()  # a killed run keeps its curves up to the last epoch
            patience = self.tcfg["early_stopping_patience"]
            if self.val_cases and patience and self.best["epoch"] is not None and epoch - self.best["epoch"] >= patience:
                self.stopped_early = True
            if self.is_main:
                self.save_checkpoint(epoch, improved)
            eta = clock.tick((self.last_epoch - epoch) if not self.stopped_early else 0)
            self.progress.epoch(epoch, self.last_epoch, train_loss=entry["train_loss"], val_loss=entry.get("val_loss"),
                                val_acc=entry.get("val_acc"), eta_s=eta, lr=entry["lr"])
            if self.stopped_early:
                self.progress.stage("train", f"early stopping at epoch {epoch} (best {self.best['epoch']})")
                break
        if tb is not None:
            tb.close()
        return self.finish(epoch)

    def run_epoch(self, epoch: int) -> dict:
        """One pass over the epoch's plan of windows; the history entry of the epoch (loss, lr, speed)."""
        import torch

        from ipmn.windows import epoch_plan

        t, dev = self.tcfg, self.dev
        self.dataset.plan = epoch_plan(self.starts, t["windows_per_case"], self.seed, epoch, self.rank, self.world)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=t["batch_size"], shuffle=False,
                                             num_workers=t["num_workers"], drop_last=False)
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        n_seen = 0
        data_wait = 0.0  # time the step waits for the loader (benchmarks: data must not be the bottleneck)
        began = time.perf_counter()
        batches = iter(loader)
        while True:
            wait_began = time.perf_counter()
            try:
                x, y, *lesion = next(batches)  # lesion: (labels, has mask) with train.lesion_loss
            except StopIteration:
                break
            data_wait += time.perf_counter() - wait_began
            loss = self._step(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True),
                              [v.to(dev, non_blocking=True) for v in lesion])
            loss_sum += float(loss.detach()) * len(y)
            n_seen += len(y)
        if not math.isfinite(float(loss_sum)):
            raise IPMNError(f"training diverged (loss is NaN/Inf at epoch {epoch}); lower train.lr or use train.amp none")
        if self.ddp:
            import torch.distributed as dist

            buf = torch.tensor([float(loss_sum), float(n_seen)], dtype=torch.float64)
            dist.all_reduce(buf)
            train_loss = float(buf[0] / max(buf[1], 1))
        else:
            train_loss = float(loss_sum) / max(n_seen, 1)
        train_s = time.perf_counter() - began
        return {"epoch": epoch, "train_loss": train_loss, "lr": float(self.optimizer.param_groups[0]["lr"]),
                "train_s": round(train_s, 4), "data_wait_s": round(data_wait, 4),
                "samples_per_s": round(n_seen / max(train_s, 1e-9), 3)}

    def _distill_loss(self, x, logits):
        """``distill_alpha`` × CE(teacher's class) (hard, DeiT), or × T² · KL(teacher ‖ student) on
        T-softened outputs (``distill_temperature`` T, Hinton et al. 2015)."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad(), self.amp_ctx:
            taught = self.teacher(x).float()
        alpha, temp = float(self.tcfg["distill_alpha"]), self.tcfg["distill_temperature"]
        if temp is None:
            return alpha * F.cross_entropy(logits, taught.argmax(dim=1))
        temp = float(temp)
        return alpha * temp**2 * F.kl_div(F.log_softmax(logits / temp, dim=1), F.log_softmax(taught / temp, dim=1),
                                          reduction="batchmean", log_target=True)

    def _step(self, x, y, lesion=()):
        """One optimiser step on a batch; returns the batch loss (``lesion``: labels and has-mask flags)."""
        import torch

        clip = self.tcfg["grad_clip"]
        self.optimizer.zero_grad(set_to_none=True)
        with self.amp_ctx:
            logits = self.model(x)
        if lesion:
            from ipmn.lesionloss import lesion_map_loss

            logits, lesion_logits = logits
        loss = self.loss_fn(logits.float(), y)
        if self.teacher is not None:  # distillation: also learn the teacher's decision (DeiT) or beliefs (soft)
            loss = (1 - float(self.tcfg["distill_alpha"])) * loss + self._distill_loss(x, logits.float())
        if lesion:
            weight = float(self.tcfg["lesion_loss"])
            loss = loss + weight * lesion_map_loss(lesion_logits, *lesion, self.lesion_weights)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), float(clip))
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), float(clip))
            self.optimizer.step()
        self.scheduler.step()
        return loss

    def validate(self, entry: dict) -> bool:
        """Validation metrics into the epoch's ``entry``; True when the epoch is the best so far."""
        from ipmn.metrics import classification_metrics
        from ipmn.windows import predict_cases

        t = self.tcfg
        logp = predict_cases(self.net, self.val_arrays, self.mcfg["k"], t["val_windows"], self.dev, self.amp_ctx,
                             stride=t["window_stride"])
        m = classification_metrics(self.val_y, np.exp(logp), self.mcfg["num_classes"])
        val_loss = float(-np.mean(logp[np.arange(len(self.val_y)), self.val_y]))
        entry.update(val_loss=val_loss, val_acc=m["accuracy"], val_balanced_accuracy=m["balanced_accuracy"],
                     val_macro_auc=m["macro_auc"], val_macro_f1=m["macro_f1"])
        if self.keep_val_logits:
            entry["val_logits"] = np.round(logp, 6).tolist()
        score = list(_score(m, val_loss, t["select_metric"]))
        if self.best["score"] is None or score > self.best["score"]:
            self.best = {"epoch": entry["epoch"], "score": score, "metrics": dict(m), "val_loss": val_loss}
            return True
        return False

    def save_checkpoint(self, epoch: int, improved: bool) -> None:
        """The best weights (when ``improved``), the resumable checkpoint and history.json, each atomically."""
        from ipmn.checkpoint import BEST, CHECKPOINT, save_tensors, state_tensors, write_checkpoint

        if improved:
            save_tensors(self.out_dir / BEST, state_tensors(self.net), {"epoch": epoch, "fingerprint": self.fingerprint})
        write_checkpoint(self.out_dir / CHECKPOINT, self.trainable, self.optimizer, self.scheduler, self.scaler,
                         {"epoch": epoch, "fingerprint": self.fingerprint, "history": self.history, "best": self.best,
                          "stopped_early": self.stopped_early})
        write_json({"history": self.history, "best": self.best}, self.out_dir / "history.json")

    # -------------------------------------------------------------------------------- the end
    def finish(self, epoch: int) -> dict:
        """Keep the best validation epoch (else the last), write the model package and summary.json."""
        from ipmn.checkpoint import BEST, CHECKPOINT, read_tensors
        from ipmn.cohort import summarize
        from ipmn.runs import SUMMARY_FILE

        best, val_cases = self.best, self.val_cases
        if val_cases and best["epoch"] is not None and (self.out_dir / BEST).exists():
            best_tensors, _ = read_tensors(self.out_dir / BEST)
            self.net.load_state_dict(best_tensors)
            chosen = best["epoch"]
        else:
            chosen = epoch
        training = self._training_record(epoch, chosen)
        summary = {
            "finished": True, "fingerprint": self.fingerprint, "best_epoch": best["epoch"], "selected_epoch": chosen,
            "epochs_run": epoch, "history": self.history, "val_metrics": best["metrics"] if val_cases else None,
            "landmarks": self.landmarks, "class_weights": training["class_weights"],
            "train_cases": [c.case_id for c in self.cases], "val_cases": [c.case_id for c in val_cases],
            "package": str(self.package_dir) if self.package_dir else None,
        }
        if self.is_main:
            if self.package_dir:
                self._write_package(training, chosen, summarize(self.cases))
            write_json(summary, self.out_dir / SUMMARY_FILE)
            if not self.tcfg["keep_checkpoint"]:
                for name in (CHECKPOINT, BEST):
                    try:
                        (self.out_dir / name).unlink()
                    except OSError:
                        pass
        self._barrier()
        self.progress.stage("train", f"finished: epoch {chosen} kept"
                            + (f", model package {self.package_dir}" if self.package_dir else ""))
        return summary

    def _training_record(self, epoch: int, chosen: int) -> dict:
        t, n_val = self.tcfg, len(self.val_cases)
        train_time = time.perf_counter() - self.t_start + sum(h["time_s"] for h in self.history[: self.start_epoch - 1])
        history = self.history if not self.keep_val_logits else [
            {k: v for k, v in h.items() if k != "val_logits"} for h in self.history]
        return {
            "optimizer": t["optimizer"], "lr": self.lr, "batch_size": t["batch_size"], "epochs": self.epochs,
            "stop_epoch": self.last_epoch, "epochs_run": epoch, "selected_epoch": chosen,
            "selection": (f"best validation {t['select_metric']} on {n_val} held-out case(s)" if n_val
                          else "last epoch (fixed in advance)" if not self.stop_epoch else
                          "fixed epoch chosen on inner cross-validation folds"),
            "stopped_early": self.stopped_early,
            # read by test-time augmentation (ipmn.predict): a flips-only model is never shown a turned grid
            "augmentation": "none" if not t["augment"] else "flips and quarter turns" if t["quarter_turns"] else "flips",
            "class_weights": None if self.weights is None else self.weights.tolist(),
            "class_weights_from": "training split" if t["class_weights"] == "balanced" else t["class_weights"],
            "windows_per_epoch": self.n_items, "world_size": self.world, "device": str(self.dev),
            "amp": self.amp_used or "none", "seed": self.seed, "train_time_s": round(train_time, 1),
            "history": history, "cohort": (self.cohort_info or {}).get("source") or f"{len(self.cases)} cases",
        }

    def _write_package(self, training: dict, chosen: int, cohort: dict) -> None:
        from ipmn.cohort import summarize
        from ipmn.models import save_package

        mcfg, info, val_cases = self.mcfg, self.cohort_info or {}, self.val_cases
        synthetic = info.get("synthetic")
        val_metrics = self.best["metrics"] if val_cases else None
        trained_on = (f"{len(self.cases)} {'synthetic phantom ' if synthetic else ''}cases ("
                      + ", ".join(f"{v} {k}" for k, v in cohort["per_class"].items()) + ")")
        pre = dict(self.cfg["preprocess"])
        if self.landmarks:
            pre["landmarks"] = self.landmarks
        pkg = {
            **mcfg,
            "name": f"{mcfg['arch']} ({'synthetic phantoms' if synthetic else Path(self.package_dir).name})",
            "preprocess": pre,
            "data": {"roi_margin_mm": self.cfg["data"]["roi_margin_mm"], "pad": self.cfg["data"]["pad"]},
            "val_windows": self.tcfg["val_windows"],
            "weights_source": {
                "kind": "trained with ipmn train",
                "initialisation": mcfg["pretrained"] or "random",
                "selected_epoch": chosen,
                "selection": training["selection"],
            },
            "training": training,
            "trained_on": trained_on,
            "cohort": {"train": cohort,
                       "validation": summarize(val_cases) if val_cases else None, **dict(info)},
            # the validation split chose the epoch: its numbers are optimistic, and the registry says so
            "validation": dict(val_metrics, selection_biased=True) if val_metrics else None,
            "card": _card(self.cohort_info, len(self.cases), mcfg),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **self.package_extra,
        }
        save_package(self.package_dir, self.net, pkg, dtype=self.tcfg["save_dtype"])
