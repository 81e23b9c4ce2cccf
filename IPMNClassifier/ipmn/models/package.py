"""Model packages: a folder holding ``model.safetensors`` (weights) and ``config.json`` (everything else).

``config.json`` is the caller's config (model keys, preprocessing parameters, class names, metrics,
``weights_source``, a model ``card`` ...) plus ``format: "ipmn-model"``, ``format_version: 1``,
``weights_dtype`` and ``software`` versions. Weights are written with safetensors (never pickled) and read
back with safetensors only; float16 storage halves the file and is loaded back as float32.

Writes are atomic: the package is assembled in a hidden temporary folder beside the target and then
renamed into place, so a reader never sees a half-written package.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import torch
from torch import nn

from ..errors import IPMNError
from ..io import json_default
from ..vocab import CONFIG_FILE, WEIGHTS_FILE

FORMAT = "ipmn-model"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def model_config_of(config: dict) -> dict:
    """The model-config part (``ipmn.models.MODEL_KEYS``) of a package config."""
    from . import MODEL_KEYS

    return {k: config[k] for k in MODEL_KEYS if k in config}


def _software_versions() -> dict:
    import ipmn

    versions = {"ipmn": getattr(ipmn, "__version__", "unknown"), "torch": torch.__version__}
    try:
        import timm

        versions["timm"] = timm.__version__
    except ImportError:  # pragma: no cover - timm is a hard dependency
        versions["timm"] = "unknown"
    return versions


def _list_some(items, n: int = 5) -> str:
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _mismatch(expected: dict, found: dict) -> str | None:
    """Describe how ``found`` (name -> shape) differs from ``expected``; None when they match."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    parts = []
    if missing:
        parts.append(f"missing keys: {_list_some(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_list_some(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch: {_list_some(shapes, 3)}")
    return "; ".join(parts) or None


def _expected_shapes(model_cfg: dict) -> dict | None:
    """Parameter shapes of the model ``model_cfg`` describes, built cheaply on the meta device."""
    from . import build_model

    cfg = dict(model_cfg, pretrained=None)
    try:
        with torch.device("meta"):
            model = build_model(cfg)
    except IPMNError:
        raise
    except Exception:  # an architecture that cannot be built on meta: skip this early check
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _is_package_dir(folder: Path) -> bool:
    try:
        with open(folder / CONFIG_FILE, encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_package(folder, model: nn.Module, config: dict, dtype: str = "float32") -> Path:
    """Write ``model`` + ``config`` as a model package folder (atomically) and return its path.

    ``config`` must contain the model config (``arch``, ``modalities`` ... missing keys get defaults) and
    may contain anything JSON-able besides. An existing package at ``folder`` is replaced; an existing
    folder that is not a package is never overwritten.
    """
    from . import normalize_config

    if dtype not in _DTYPES:
        raise IPMNError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if not isinstance(config, dict):
        raise IPMNError(f"package config must be a dict, got {type(config).__name__}")
    folder = Path(folder).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise IPMNError(f"cannot write model package: {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not _is_package_dir(folder):
        raise IPMNError(
            f"refusing to overwrite {folder}: it is a non-empty folder that is not an IPMN model package"
        )

    model_cfg = normalize_config(model_config_of(config))
    out = dict(config)
    out.update(model_cfg)
    out.update(
        format=FORMAT, format_version=FORMAT_VERSION, weights_dtype=dtype, software=_software_versions()
    )
    try:
        text = json.dumps(out, indent=2, default=json_default)
    except (TypeError, ValueError) as exc:
        raise IPMNError(f"package config is not JSON-serialisable: {exc}") from exc

    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper -> the module itself
    target = _DTYPES[dtype]
    tensors = {}
    for name, value in model.state_dict().items():
        value = value.detach().to("cpu")
        if value.is_floating_point():
            value = value.to(target)
        tensors[name] = value.clone().contiguous()  # clone: safetensors refuses shared storage
    expected = _expected_shapes(model_cfg)
    if expected is not None:
        problem = _mismatch(expected, {k: tuple(v.shape) for k, v in tensors.items()})
        if problem:
            raise IPMNError(f"the model does not match its config (arch '{model_cfg['arch']}'): {problem}")

    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = folder.parent / f".{folder.name}.tmp-{tag}"
    old = folder.parent / f".{folder.name}.old-{tag}"
    try:
        tmp.mkdir()
        # one metadata key: safetensors writes the header's metadata in a hash map's per-process order, so
        # two keys made the same tensors give different file bytes (config.json names the format)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        _shareable(tmp)
        if folder.exists():
            os.replace(folder, old)
            try:
                os.replace(tmp, folder)
            except OSError:
                os.replace(old, folder)  # put the previous package back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except OSError as exc:
        raise IPMNError(f"cannot write model package {folder}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _shareable(folder: Path) -> None:
    """Give the package the permissions of any file the user creates (temporary-file writers make 0600,
    and a package others cannot read cannot be shared or registered)."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~mask)


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: Path, legacy_age_s: float = 3600.0) -> None:
    """Remove the temporary folders of ``folder`` that killed writers left beside it (``.NAME.tmp-PID-TAG``
    of a process that no longer runs; older names without a PID once an hour old). A stale ``.old-``
    folder is the previous package: it is put back if the package is missing, else removed."""
    for path in folder.parent.glob(f".{folder.name}.*-*"):
        m = _TEMP_NAME.match(path.name)
        if not m or m["name"] != folder.name or not path.is_dir() or path.is_symlink():
            continue
        if m["pid"] is not None:
            stale = int(m["pid"]) != os.getpid() and not _alive(int(m["pid"]))
        else:
            try:
                stale = time.time() - path.stat().st_mtime > legacy_age_s
            except OSError:
                stale = False
        if not stale:
            continue
        if m["kind"] == "old" and not folder.exists():
            os.replace(path, folder)
        else:
            shutil.rmtree(path, ignore_errors=True)


def read_package_config(folder) -> dict:
    """Read and check a package's ``config.json`` (format, version, model config) without the weights."""
    from ..registry import read_config_json
    from . import normalize_config

    folder = Path(folder).expanduser()
    if not folder.exists():
        raise IPMNError(f"model package not found: {folder}")
    if not folder.is_dir():
        raise IPMNError(
            f"{folder} is not a model package folder (expected a folder with {WEIGHTS_FILE} and {CONFIG_FILE})"
        )
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise IPMNError(f"{folder} is not a model package: {CONFIG_FILE} is missing")
    config = read_config_json(path)
    if config.get("format") != FORMAT:
        raise IPMNError(
            f"{path} is not an IPMN model config (format is {config.get('format')!r}, expected '{FORMAT}')"
        )
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        raise IPMNError(
            f"{path} has unsupported format_version {version!r}; this ipmn reads version {FORMAT_VERSION} "
            "(a newer package needs a newer ipmn)"
        )
    try:
        normalize_config(model_config_of(config))
    except IPMNError as exc:
        raise IPMNError(f"{path}: {exc}") from exc
    return config


def load_package(folder, device="cpu") -> tuple[nn.Module, dict]:
    """Load a model package: ``(model.eval() on device, config dict)``.

    Refuses with one :class:`IPMNError` when the folder, ``config.json`` or ``model.safetensors`` is
    missing, the config is invalid JSON / not an IPMN package / an unsupported version, or the weights
    do not fit the architecture (missing / unexpected / mis-shaped keys, first few named).
    """
    from . import build_model, normalize_config

    config = read_package_config(folder)
    folder = Path(folder).expanduser()
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise IPMNError(f"{folder} is not a complete model package: {WEIGHTS_FILE} is missing")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise IPMNError(f"unknown device {device!r}") from exc

    from safetensors.torch import load_file

    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise IPMNError(f"cannot read {weights}: {type(exc).__name__}: {str(exc).strip()[:200]}") from exc

    # never fetch pretrained weights again: the package holds all of them
    model_cfg = dict(normalize_config(model_config_of(config)), pretrained=None)
    # build on the meta device (no random init: ~2 s saved for ViT-B) and adopt the loaded tensors
    try:
        with torch.device("meta"):
            model = build_model(model_cfg)
        on_meta = True
    except IPMNError:
        raise
    except Exception:  # an architecture that cannot be built on meta
        model, on_meta = build_model(model_cfg), False
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problem = _mismatch(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise IPMNError(f"weights in {weights} do not match architecture '{model_cfg['arch']}': {problem}")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise IPMNError(f"weights in {weights} contain NaN or infinite values: {_list_some(bad)}")
    model.load_state_dict(state, strict=True, assign=on_meta)
    if on_meta and any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model = build_model(model_cfg)  # non-persistent buffers need a real build
        model.load_state_dict(state, strict=True)
    try:
        model = model.to(dev)
    except (RuntimeError, AssertionError) as exc:
        raise IPMNError(f"cannot move the model to {device!r}: {exc}") from exc
    return model.eval(), config
