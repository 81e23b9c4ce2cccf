"""Configuration: one typed dataclass per section, presets, and the resolved run config.

A config file (YAML) or a bundled preset (``paper``, ``reference``, ``practical``, ``demo`` in
``ipmn/presets``) has up to five sections, each a :class:`Section` dataclass:

====================  ===================================================================
``model``             :class:`ModelConfig` — architecture, inputs, grid shape, classes
``preprocess``        :class:`PreprocessConfig` — N4, smoothing, standardisation on the ROI grid
``train``             :class:`TrainConfig` — optimiser, schedule, sampling, selection, precision
``cv``                :class:`CVConfig` — nested cross-validation
``data``              :class:`DataConfig` — how cases are read (ROI margin, NaN policy, padding, cache)
====================  ===================================================================

Every section is built the same way: ``Section.from_dict(values)`` refuses unknown keys (listing the
valid ones), fills defaults and validates; ``to_dict()`` gives the JSON form that run folders, model
packages and fingerprints store. :func:`resolve_config` = defaults + config file + overrides (e.g.
command-line flags) → a dict of the five sections' dicts. Architecture aliases live in
:mod:`ipmn.vocab`. Slightly over 500 lines on purpose: every configuration rule of the project in one file.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ipmn.errors import IPMNError
from ipmn.vocab import CLASS_NAMES, MODALITIES, is_perfect_square, resolve_arch

SECTIONS = ("model", "preprocess", "train", "cv", "data")
SELECT_METRICS = ("balanced_accuracy", "accuracy", "macro_auc", "loss")
LOGGING_ONLY = ("tensorboard",)
"""Train options that change what is logged, not what is trained: left out of a run's fingerprint, so
that a run may be resumed with them switched."""
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
MAX_CELL = 512
"""Largest grid cell (pixels per slice): a 3 x 3 grid of 512 px cells is already 1536 px wide."""


# ------------------------------------------------------------------------------------------------ values
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _positive(v) -> bool:
    return _is_number(v) and v > 0 and math.isfinite(v)


class Section:
    """Base of the config sections: unknown keys refused, defaults filled, values validated."""

    NAME = ""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict | None = None, **context):
        """Validated section from a mapping; ``context`` goes to :meth:`validate` (e.g. the class count)."""
        if values is not None and not isinstance(values, dict):
            raise IPMNError(f"config section '{cls.NAME}' must be a mapping of options, got {type(values).__name__}")
        values = copy.deepcopy(dict(values or {}))
        unknown = [k for k in values if k not in cls.keys()]
        if unknown:
            raise IPMNError(f"config section '{cls.NAME}': unknown option(s) {sorted(map(str, unknown))}; "
                            f"valid keys: {', '.join(cls.keys())}")
        obj = cls(**values)
        obj.validate(**context)
        return obj

    def validate(self) -> None:  # pragma: no cover - every section overrides it
        raise NotImplementedError

    def bad(self, key: str, what: str):
        raise IPMNError(f"{self.NAME}.{key} must be {what} (got {getattr(self, key)!r})")

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ model
VIT_OVERRIDES = ("depth", "embed_dim", "num_heads", "patch_size")
STEMS = ("patch", "conv", "cnn")
VIT_ONLY = (*VIT_OVERRIDES, "stem", "reg_tokens")
"""Model keys that only ViTs take: a CNN variant of a ViT config drops them (``--arch``, ``--models``)."""
"""ViT patch embeddings: timm's linear patches, or the convolutional stems of :mod:`ipmn.models.stems`."""
"""Model keys passed straight to ``timm.create_model`` for ViTs when set (``None`` = timm's value)."""


@dataclass
class ModelConfig(Section):
    """Architecture and input layout; ``img_size`` is always ``sqrt(k) * cell``."""

    NAME = "model"
    arch: str = "vit_base_patch16_224"
    modalities: list = field(default_factory=lambda: list(MODALITIES))
    fusion: str = "early"  # early: one channel per modality | late: one ViT per modality
    k: int = 9  # slices per grid (a perfect square)
    cell: int = 64  # pixels per slice
    img_size: int | None = None  # sqrt(k) * cell
    num_classes: int = 3
    class_names: list | None = None  # CLASS_NAMES when num_classes == 3
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    stem: str = "patch"  # ViT patch embedding: patch (timm's linear) | conv | cnn (ipmn.models.stems, from scratch)
    reg_tokens: int = 0  # ViT register tokens (Darcet 2024); Attention Rollout reads patch tokens only
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    pretrained: str | None = None  # None | "hub" | a local weights file

    def validate(self) -> None:
        vit = self._validate_arch()
        self._validate_inputs(vit)
        self._validate_grid()
        self._validate_classes()
        for key in VIT_OVERRIDES:
            v = getattr(self, key)
            if v is None:
                continue
            if not vit:
                raise IPMNError(f"{key} is a ViT setting; '{self.arch}' is a CNN (remove {key})")
            if not _is_int(v) or v < 1:
                raise IPMNError(f"{key} must be a positive integer, got {v!r}")
        if self.patch_size is not None and self.img_size % self.patch_size:
            raise IPMNError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.stem not in STEMS:
            raise IPMNError(f"stem must be one of {', '.join(STEMS)}, got {self.stem!r}")
        if not _is_int(self.reg_tokens) or self.reg_tokens < 0:
            raise IPMNError(f"reg_tokens must be an integer >= 0, got {self.reg_tokens!r}")
        if not vit and (self.stem != "patch" or self.reg_tokens):
            raise IPMNError(f"stem and reg_tokens are ViT settings; '{self.arch}' is a CNN (remove them)")
        for key in ("drop_rate", "drop_path_rate"):
            v = getattr(self, key)
            if not _is_number(v) or not 0.0 <= v < 1.0:
                raise IPMNError(f"{key} must be a number in [0, 1), got {v!r}")
            setattr(self, key, float(v))
        pre = None if self.pretrained in (False, "") else self.pretrained
        if pre is not None and not isinstance(pre, str):
            raise IPMNError(f"pretrained must be null, 'hub' or a weights file path, got {pre!r}")
        self.pretrained = pre
        if pre is not None and self.stem != "patch":
            raise IPMNError(f"stem '{self.stem}' is for training from scratch; pretrained weights need stem 'patch'")

    def _validate_arch(self) -> bool:
        from ipmn.models.cnn import CNN_ARCHS
        from ipmn.models.vit import is_vit_arch

        arch = resolve_arch(self.arch)
        if not isinstance(arch, str) or not arch.strip():
            raise _arch_error(arch)
        arch = self.arch = arch.strip()
        base = arch.split(".", 1)[0]
        if base in CNN_ARCHS:
            if "." in arch:
                raise IPMNError(f"arch '{arch}': pretrained tags are only supported for timm ViTs, use '{base}'")
            return False
        if is_vit_arch(arch):
            return True
        raise _arch_error(arch)

    def _validate_inputs(self, vit: bool) -> None:
        mods = list(self.modalities) if isinstance(self.modalities, tuple) else self.modalities
        if not isinstance(mods, list) or not mods or any(m not in MODALITIES for m in mods) or len(set(mods)) != len(mods):
            raise IPMNError(f"modalities must be a list drawn from {list(MODALITIES)} without repeats, got {mods!r}")
        self.modalities = mods
        if self.fusion not in ("early", "late"):
            raise IPMNError(f"fusion must be 'early' or 'late', got {self.fusion!r}")
        if self.fusion == "late":
            if not vit:
                raise IPMNError(f"late fusion is only available for ViTs, not '{self.arch}'")
            if len(mods) != 2:
                raise IPMNError(f"late fusion needs two modalities (one ViT each), got {mods}")

    def _validate_grid(self) -> None:
        k, cell = self.k, self.cell
        if not is_perfect_square(k):
            raise IPMNError(f"k (slices per grid) must be a perfect square (4, 9, 16 ...), got {k!r}")
        if not _is_int(cell) or cell < 1:
            raise IPMNError(f"cell (pixels per slice) must be a positive integer, got {cell!r}")
        expected = math.isqrt(k) * cell
        if self.img_size is None:
            self.img_size = expected
        elif not _is_int(self.img_size) or self.img_size != expected:
            raise IPMNError(
                f"img_size must equal sqrt(k) * cell = {expected} (k={k}, cell={cell}), got {self.img_size!r}"
            )

    def _validate_classes(self) -> None:
        nc = self.num_classes
        if not _is_int(nc) or nc < 2:
            raise IPMNError(f"num_classes must be an integer >= 2, got {nc!r}")
        names = self.class_names
        if names is None:
            if nc != len(CLASS_NAMES):
                raise IPMNError(f"class_names must be given when num_classes is {nc}")
            names = list(CLASS_NAMES)
        if isinstance(names, tuple):
            names = list(names)
        if not isinstance(names, list) or len(names) != nc or not all(isinstance(n, str) and n for n in names):
            raise IPMNError(f"class_names must be a list of {nc} non-empty names, got {names!r}")
        if len(set(names)) != len(names):
            raise IPMNError(f"class_names must be distinct, got {names}")
        self.class_names = names


def _arch_error(arch) -> IPMNError:
    from ipmn.models.cnn import CNN_ARCHS

    choices = list(CNN_ARCHS)
    try:
        from ipmn.models.vit import vit_arch_names

        choices += vit_arch_names()
    except Exception:  # noqa: BLE001 - timm missing: still give a useful message
        pass
    close = difflib.get_close_matches(str(arch), choices, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return IPMNError(
        f"unknown arch '{arch}'{hint}; valid: any timm ViT (e.g. vit_base_patch16_224, vit_small_patch16_224, "
        f"vit_tiny_patch16_224) or one of {', '.join(CNN_ARCHS)}"
    )


def normalize_config(cfg: dict | None = None) -> dict:
    """A complete, validated copy of a model config as a dict (defaults filled in)."""
    if cfg is not None and not isinstance(cfg, dict):
        raise IPMNError(f"model config must be a mapping of keys to values, got {type(cfg).__name__}")
    return ModelConfig.from_dict(cfg).to_dict()


MODEL_KEYS = tuple(ModelConfig.keys())
MODEL_DEFAULTS = ModelConfig().to_dict()
"""Model-config keys and defaults. ``None`` for depth/embed_dim/num_heads/patch_size = timm's value."""


# ------------------------------------------------------------------------------------------------ preprocess
STANDARDIZATIONS = ("zscore", "nyul", "minmax", "none")


@dataclass
class PreprocessConfig(Section):
    """Preprocessing on the ROI grid (see :mod:`ipmn.preprocess`)."""

    NAME = "preprocess"
    cell: int = 64  # grid pixels across the ROI in-plane
    # Fixed in-plane pixel size in mm: one number, or [along patient left, along posterior]; None = the ROI
    # divided into cell x cell pixels (each case its own scale). Left out of to_dict() when None, so the
    # fingerprints of configs and caches that predate it are unchanged.
    grid_spacing_mm: float | list | None = None
    reference: str = "t1"  # modality whose slice spacing sets the grid's slices
    slice_spacing: float | None = None  # override the reference's slice spacing (mm)
    margin_mm: float = 20.0  # context around the ROI for N4 / smoothing
    n4: bool = True
    n4_shrink: int = 4
    n4_iterations: tuple = (25, 15)  # 2 fitting levels: same residual bias as (50, 50, 30) here, ~45 % faster
    smoothing: str = "curvature"  # "curvature" | "gradient" | "none"
    smoothing_iterations: int = 5
    smoothing_conductance: float = 1.0
    antialias: bool = True  # Gaussian prefilter when the grid is much coarser than the volume
    standardize: str = "zscore"  # "zscore" | "nyul" | "minmax" (per-case percentile 0-1) | "none"
    scale01: bool = False  # version 2: only the old spelling of minmax (standardize: none + scale01: true)
    scale_percentiles: tuple = (0.5, 99.5)
    min_coverage: float = 0.5  # refuse a modality that covers less of the ROI grid than this
    version: int = 2  # standardisation rules; 1 = before z-score/Nyul stopped being followed by 0-1 scaling

    def validate(self) -> None:
        for key in ("n4_iterations", "scale_percentiles"):
            if isinstance(getattr(self, key), list | tuple):
                setattr(self, key, tuple(getattr(self, key)))
        if self.version not in (1, 2):
            raise IPMNError(f"preprocessing: version must be 1 or 2 (got {self.version!r})")
        names = ("zscore", "nyul", "none") if self.version == 1 else STANDARDIZATIONS
        if self.standardize not in names:
            raise IPMNError(f"preprocessing: standardize must be one of {', '.join(names)} (got {self.standardize!r})")
        if self.version == 2 and self.scale01 and self.standardize in ("zscore", "nyul"):
            raise IPMNError(
                f"preprocessing: scale01 would rescale every case to 0-1 after {self.standardize} and undo it; "
                "use standardize: minmax for 0-1 scaling, or scale01: false"
            )
        if self.smoothing not in ("curvature", "gradient", "none"):
            raise IPMNError(f"preprocessing: smoothing must be curvature, gradient or none (got {self.smoothing!r})")
        if not _is_int(self.cell) or not 8 <= self.cell <= MAX_CELL:
            raise IPMNError(f"preprocessing: cell must be an integer from 8 to {MAX_CELL} pixels (got {self.cell!r})")
        self._validate_numbers()

    def _validate_numbers(self) -> None:
        """The values a model package or YAML file may carry: each in the range the filters accept."""
        if self.reference not in MODALITIES:
            self.bad("reference", f"one of {list(MODALITIES)}")
        gs = self.grid_spacing_mm
        if gs is not None and not (
            (_positive(gs) and gs <= 20)
            or (isinstance(gs, list | tuple) and len(gs) == 2 and all(_positive(v) and v <= 20 for v in gs))
        ):
            self.bad("grid_spacing_mm", "null, a pixel size in mm (0-20), or two: [along left, along posterior]")
        if self.slice_spacing is not None and not _positive(self.slice_spacing):
            self.bad("slice_spacing", "a positive number of mm or null")
        if not (_is_number(self.margin_mm) and math.isfinite(self.margin_mm) and 0 <= self.margin_mm <= 200):
            self.bad("margin_mm", "a number of mm from 0 to 200")
        for key in ("n4", "antialias", "scale01"):
            if not isinstance(getattr(self, key), bool):
                self.bad(key, "true or false")
        if not _is_int(self.n4_shrink) or not 1 <= self.n4_shrink <= 16:
            self.bad("n4_shrink", "an integer from 1 to 16")
        its = self.n4_iterations
        if not (isinstance(its, tuple) and 1 <= len(its) <= 8 and all(_is_int(i) and 1 <= i <= 1000 for i in its)):
            self.bad("n4_iterations", "a list of 1 to 8 integers from 1 to 1000 (one per fitting level)")
        if not _is_int(self.smoothing_iterations) or not 0 <= self.smoothing_iterations <= 100:
            self.bad("smoothing_iterations", "an integer from 0 to 100")
        if not _positive(self.smoothing_conductance):
            self.bad("smoothing_conductance", "a positive number")
        pct = self.scale_percentiles
        if not (isinstance(pct, tuple) and len(pct) == 2 and all(_is_number(v) and math.isfinite(v) for v in pct)
                and 0 <= pct[0] < pct[1] <= 100):
            self.bad("scale_percentiles", "two percentiles [low, high] with 0 <= low < high <= 100")
        if not (_is_number(self.min_coverage) and 0 < self.min_coverage <= 1):
            self.bad("min_coverage", "a fraction in (0, 1]")

    def bad(self, key: str, what: str):
        raise IPMNError(f"preprocessing: {key} must be {what} (got {getattr(self, key)!r})")

    @property
    def pixel_mm(self) -> tuple[float, float] | None:
        """``grid_spacing_mm`` as (along left, along posterior), or None."""
        gs = self.grid_spacing_mm
        if gs is None:
            return None
        return (float(gs[0]), float(gs[1])) if isinstance(gs, list | tuple) else (float(gs), float(gs))

    @classmethod
    def from_package(cls, d: dict | None) -> PreprocessConfig:
        """The preprocessing recorded in a model package. Packages without ``version`` predate rules
        version 2 and are read with the old rules and the old defaults (``scale01`` was true)."""
        d = dict(d or {})
        if "version" not in d:
            d = {"standardize": "zscore", "scale01": True, **d, "version": 1}
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n4_iterations"] = list(self.n4_iterations)
        d["scale_percentiles"] = list(self.scale_percentiles)
        if d["grid_spacing_mm"] is None:
            del d["grid_spacing_mm"]
        elif isinstance(d["grid_spacing_mm"], tuple):
            d["grid_spacing_mm"] = list(d["grid_spacing_mm"])
        return d


def package_preprocess(config: dict, where: str = "model") -> tuple[PreprocessConfig, dict | None]:
    """The preprocessing a model package was trained with, validated, and its learned Nyúl landmarks.

    ``where`` (e.g. the package's config.json) prefixes any error: a package whose values the filters
    cannot take is refused before any case is read.
    """
    pre = config.get("preprocess") or {}
    if not isinstance(pre, dict):
        raise IPMNError(f"{where}: 'preprocess' must be a mapping of options, got {type(pre).__name__}")
    pre = dict(pre)
    landmarks = pre.pop("landmarks", None) or config.get("landmarks")
    if landmarks is not None and not isinstance(landmarks, dict):
        raise IPMNError(f"{where}: 'landmarks' must be a mapping of modality to landmarks")
    pre.setdefault("cell", config.get("cell", 64))
    try:
        return PreprocessConfig.from_package(pre), landmarks
    except (IPMNError, TypeError) as exc:
        raise IPMNError(f"{where}: {exc}") from exc


# ------------------------------------------------------------------------------------------------ train
@dataclass
class TrainConfig(Section):
    """One training run (paper: Adam, lr 0.003, batch 8)."""

    NAME = "train"
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 0.003
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    batch_size: int = 8
    epochs: int = 50  # paper: 3000 (see the paper preset)
    warmup_epochs: int = 0
    schedule: str = "none"  # none | cosine (per step, after the warm-up)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    class_weights: object = "balanced"  # balanced (training split only) | none | [w_normal, w_low, w_high]
    label_smoothing: float = 0.0
    augment: bool = True
    # Quarter turns swap the grid's two in-plane axes: with anisotropic pixels (grid_spacing_mm [2.4, 1.0])
    # a turned cyst is 2.4x too wide, an image no scanner makes. false = flips only (left-right, up-down);
    # test-time augmentation of the model then uses the same views.
    quarter_turns: bool = True
    windows_per_case: int | None = None  # cap on training windows drawn per case and epoch (None = all)
    window_stride: int = 1
    window_reach: int | None = None  # training windows start at most this many slices from the central one
    val_windows: str = "central"  # central | all (probabilities averaged per case)
    select_metric: str = "balanced_accuracy"  # balanced_accuracy | accuracy | macro_auc | loss
    early_stopping_patience: int | None = None
    grad_clip: float | None = None
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 (CUDA) | none
    num_workers: int = 0
    seed: int = 0
    deterministic: bool = True
    save_dtype: str = "float32"  # float32 | float16 (package weights)
    keep_checkpoint: bool = False  # keep the last checkpoint after a finished run
    tensorboard: bool = False  # also log each epoch's scalars to <run folder>/tensorboard
    # Distillation (DeiT's hard-label variant): a CNN teacher of this arch is trained first on the same
    # training split (teacher_epochs, default epochs); the loss is (1 - distill_alpha) * CE(label)
    # + distill_alpha * CE(teacher's class). None = no teacher. distill_temperature T: soft labels instead
    # (Hinton et al. 2015): distill_alpha * T^2 * KL(teacher || student), both softened by T.
    teacher_arch: str | None = None
    teacher_epochs: int | None = None
    distill_alpha: float = 0.5
    distill_temperature: float | None = None
    # Auxiliary lesion-map loss (ipmn.lesionloss): weight of a loss that also teaches the network where the
    # cohort's lesion masks (column 'lesion') put each lesion label; 0 = off. Training only: the package is
    # the plain classifier. Cases without a mask take no part; a cohort without any is refused.
    lesion_loss: float = 0.0

    def validate(self, num_classes: int = 3) -> None:
        if self.optimizer not in ("adam", "adamw", "sgd"):
            self.bad("optimizer", "adam, adamw or sgd")
        if not _positive(self.lr):
            self.bad("lr", "a positive number")
        for key in ("weight_decay", "momentum", "min_lr_ratio", "label_smoothing", "lesion_loss"):
            v = getattr(self, key)
            if not _is_number(v) or v < 0 or not math.isfinite(v):
                self.bad(key, "a number >= 0")
        if self.label_smoothing >= 1 or self.min_lr_ratio > 1:
            self.bad("label_smoothing" if self.label_smoothing >= 1 else "min_lr_ratio", "below 1")
        for key in ("batch_size", "epochs", "window_stride"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                self.bad(key, "an integer >= 1")
        if not _is_int(self.warmup_epochs) or self.warmup_epochs < 0:
            self.bad("warmup_epochs", "an integer >= 0")
        if self.schedule not in ("cosine", "none"):
            self.bad("schedule", "cosine or none")
        self._validate_class_weights(num_classes)
        for key in ("augment", "quarter_turns", "deterministic", "keep_checkpoint", "tensorboard"):
            if not isinstance(getattr(self, key), bool):
                self.bad(key, "true or false")
        self._validate_distillation()
        reach = self.window_reach
        if reach is not None and (not _is_int(reach) or reach < 0):
            self.bad("window_reach", "an integer >= 0 or null")
        wpc = self.windows_per_case
        if wpc is not None and (not _is_int(wpc) or wpc < 1):
            self.bad("windows_per_case", "an integer >= 1 or null")
        if self.val_windows not in ("central", "all"):
            self.bad("val_windows", "central or all")
        if self.select_metric not in SELECT_METRICS:
            self.bad("select_metric", " | ".join(SELECT_METRICS))
        p = self.early_stopping_patience
        if p is not None and (not _is_int(p) or p < 1):
            self.bad("early_stopping_patience", "an integer >= 1 or null")
        if self.grad_clip is not None and not _positive(self.grad_clip):
            self.bad("grad_clip", "a positive number or null")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            self.bad("amp", "auto, bf16, fp16 or none")
        if not _is_int(self.num_workers) or self.num_workers < 0:
            self.bad("num_workers", "an integer >= 0")
        if not _is_int(self.seed):
            self.bad("seed", "an integer")
        if self.save_dtype not in ("float32", "float16"):
            self.bad("save_dtype", "float32 or float16")

    def _validate_distillation(self) -> None:
        from ipmn.models.cnn import CNN_ARCHS

        if self.teacher_arch is not None:
            self.teacher_arch = resolve_arch(self.teacher_arch)
            if self.teacher_arch not in CNN_ARCHS:
                self.bad("teacher_arch", f"null or one of {', '.join(CNN_ARCHS)}")
        te = self.teacher_epochs
        if te is not None and (not _is_int(te) or te < 1):
            self.bad("teacher_epochs", "an integer >= 1 or null")
        a = self.distill_alpha
        if not (_is_number(a) and 0 <= a <= 1):
            self.bad("distill_alpha", "a number from 0 to 1")
        if self.distill_temperature is not None and not _positive(self.distill_temperature):
            self.bad("distill_temperature", "a positive number or null (hard labels)")

    def _validate_class_weights(self, num_classes: int) -> None:
        cw = self.class_weights
        if cw is None or cw is False:
            self.class_weights = "none"
        elif isinstance(cw, str):
            if cw not in ("balanced", "none"):
                self.bad("class_weights", "balanced, none or a list of weights")
        elif not (isinstance(cw, list) and len(cw) == num_classes and all(_positive(w) for w in cw)):
            self.bad("class_weights", f"balanced, none or a list of {num_classes} positive weights")


# ------------------------------------------------------------------------------------------------ cv
@dataclass
class CVConfig(Section):
    """Nested cross-validation (see :mod:`ipmn.cv`)."""

    NAME = "cv"
    outer: int = 10
    inner: int = 3
    select: list = field(default_factory=lambda: ["epoch"])  # [epoch] or [epoch, lr]
    lr_grid: list | None = None
    temperature: bool = True
    seed: int = 0
    group_by: str = "patient"  # patient | center
    leave_one_center_out: bool = False
    stratify_center: bool = True
    examples: int = 4  # test grids with rollout maps per fold in the report

    def validate(self) -> None:
        if not _is_int(self.outer) or self.outer < 2:
            self.bad("outer", "an integer >= 2")
        if not _is_int(self.inner) or self.inner < 2:
            self.bad("inner", "an integer >= 2")
        if isinstance(self.select, str):
            self.select = [self.select]
        sel = self.select
        if not isinstance(sel, list) or "epoch" not in sel or any(s not in ("epoch", "lr") for s in sel):
            self.bad("select", "[epoch] or [epoch, lr]")
        grid = self.lr_grid
        if "lr" in sel:
            if not isinstance(grid, list) or not grid or not all(_positive(v) for v in grid):
                self.bad("lr_grid", "a non-empty list of positive learning rates when select includes lr")
        elif grid is not None and not (isinstance(grid, list) and all(_positive(v) for v in grid)):
            self.bad("lr_grid", "a list of positive learning rates or null")
        for key in ("temperature", "leave_one_center_out", "stratify_center"):
            if not isinstance(getattr(self, key), bool):
                self.bad(key, "true or false")
        if self.group_by not in ("patient", "center"):
            self.bad("group_by", "patient or center")
        if not _is_int(self.seed):
            self.bad("seed", "an integer")
        if not _is_int(self.examples) or self.examples < 0:
            self.bad("examples", "an integer >= 0")


# ------------------------------------------------------------------------------------------------ data
@dataclass
class DataConfig(Section):
    """How the cases of a cohort are read."""

    NAME = "data"
    roi_margin_mm: float = 10.0  # margin around a mask's bounding box when the ROI comes from a mask
    nonfinite: str = "refuse"  # refuse | clean
    pad: bool = False  # replicate the last slice of ROIs with fewer than k slices (reference code)
    cache_dir: str | None = None

    def validate(self) -> None:
        if not _is_number(self.roi_margin_mm) or not 0 <= self.roi_margin_mm <= 200:
            self.bad("roi_margin_mm", "a number of mm from 0 to 200")
        if self.nonfinite not in ("refuse", "clean"):
            self.bad("nonfinite", "refuse or clean")
        if not isinstance(self.pad, bool):
            self.bad("pad", "true or false")


# ------------------------------------------------------------------------------------------------ files
def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    """A YAML file holding a mapping ({} when empty); one clear error otherwise."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError as exc:
        raise IPMNError(f"config file not found: {path}") from exc
    except OSError as exc:
        raise IPMNError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise IPMNError(f"config file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 YAML") from exc
    except yaml.YAMLError as exc:
        raise IPMNError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise IPMNError(f"config file {path} must hold a mapping with sections {list(SECTIONS)}")
    return data


def load_config(spec=None) -> dict:
    """A YAML config file, or the name of a bundled preset (:func:`list_presets`); ``None`` = {}."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        raw = read_yaml(path)
    elif str(spec) in list_presets():
        raw = read_yaml(PRESETS_DIR / f"{spec}.yaml")
    else:
        raise IPMNError(f"config file not found: {spec} (or give a preset name: {', '.join(list_presets())})")
    check_sections(raw, where=str(spec))
    return raw


def check_sections(raw: dict, where: str = "config") -> None:
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise IPMNError(f"{where}: unknown section(s) {unknown}; valid sections: {list(SECTIONS)}")
    for section in SECTIONS:
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise IPMNError(f"{where}: section '{section}' must be a mapping of options")


# ------------------------------------------------------------------------------------------------ resolved
def resolve_config(raw: dict | None = None, overrides: dict | None = None) -> dict:
    """Defaults + config file + overrides (e.g. CLI flags; ``None`` values ignored), every section validated.

    Returns ``{section: Section.to_dict()}`` for the five sections. Any unknown key raises an
    :class:`IPMNError` naming it and the valid ones.
    """
    raw = copy.deepcopy(raw or {})
    check_sections(raw)
    for section, values in (overrides or {}).items():
        if section not in SECTIONS:
            raise IPMNError(f"unknown config section {section!r}; valid sections: {list(SECTIONS)}")
        merged = dict(raw.get(section) or {})
        merged.update({k: v for k, v in values.items() if v is not None})
        raw[section] = merged

    model = normalize_config(dict(raw.get("model") or {}))
    pre = dict(raw.get("preprocess") or {})
    if "cell" in pre and pre["cell"] != model["cell"]:
        raise IPMNError(f"preprocess.cell ({pre['cell']}) differs from model.cell ({model['cell']}); set one of them")
    pre["cell"] = model["cell"]
    return {
        "model": model,
        "preprocess": PreprocessConfig.from_dict(pre).to_dict(),
        "train": TrainConfig.from_dict(raw.get("train"), num_classes=model["num_classes"]).to_dict(),
        "cv": CVConfig.from_dict(raw.get("cv")).to_dict(),
        "data": DataConfig.from_dict(raw.get("data")).to_dict(),
    }


def is_resolved(config) -> bool:
    """True for the output of :func:`resolve_config` (every section present, every train key filled)."""
    return (isinstance(config, dict) and set(config) == set(SECTIONS)
            and isinstance(config.get("train"), dict) and set(config["train"]) == set(TrainConfig.keys()))


def config_digest(obj) -> str:
    """A short, stable fingerprint of a JSON-able object (run folders compare them)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
