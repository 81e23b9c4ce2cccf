"""Where code runs: the torch device from a user's ``--device``, the numeric precision, and the
distributed rank under torchrun (shared by predict, train and cv)."""

from __future__ import annotations

import os

from ipmn.errors import IPMNError


def resolve_device(device: str = "auto", local_rank: int = 0):
    """``auto`` → CUDA when available else CPU; ``cuda`` → ``cuda:<local_rank>`` (DDP); ``cuda:N``; ``cpu``."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise IPMNError(
                f"device {device!r} asked for but CUDA is not available (torch {torch.__version__}, "
                f"{'no GPU found' if torch.version.cuda else 'a CPU-only build'}); use --device cpu or auto"
            )
        return torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if device == "cpu":
        return torch.device("cpu")
    raise IPMNError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def native_bf16_cpu() -> bool:
    """True when this CPU computes bfloat16 matrix products in hardware (AVX512-BF16 or AMX).

    Without it torch still accepts bf16 on the CPU but emulates it, which is slower than fp32.
    """
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except (RuntimeError, AttributeError):  # private probes: absent or failing on some builds
            continue
    return False


def resolve_precision(precision: str, device, native_cpu_bf16: bool | None = None) -> str:
    """``auto`` → ``bf16`` on a CUDA GPU with bf16 tensor cores (Ampere or newer; ``fp16`` on older GPUs)
    and on a CPU with native bf16, else ``fp32``. An explicit ``fp32`` / ``bf16`` / ``fp16`` is taken as
    asked, except ``fp16`` on the CPU, which is refused (``bf16`` on an older GPU runs, emulated)."""
    import torch

    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise IPMNError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    cuda = getattr(device, "type", str(device)).startswith("cuda")
    if precision == "auto":
        if cuda:
            # is_bf16_supported() also says yes for emulated bf16 (V100, T4): ask for bf16 tensor cores
            return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
        return "bf16" if (native_bf16_cpu() if native_cpu_bf16 is None else native_cpu_bf16) else "fp32"
    if precision == "fp16" and not cuda:
        raise IPMNError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


def autocast(precision: str, device):
    """The autocast context for a resolved precision (``fp32``: a disabled one)."""
    import torch

    kind = getattr(device, "type", str(device)).split(":")[0]
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "fp32":
        return torch.autocast(kind, enabled=False)
    if precision not in dtypes:
        raise ValueError(f"autocast takes a resolved precision (fp32, bf16 or fp16), not {precision!r}")
    return torch.autocast(kind, dtype=dtypes[precision])


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def autocast_for(amp: str, device):
    """(autocast context, precision used or None) for ``train.amp``; auto = bf16 on CUDA, off on the CPU."""
    import contextlib

    from ipmn.device import autocast

    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "none":
        return contextlib.nullcontext(), None
    if amp == "fp16" and device.type != "cuda":
        raise IPMNError("train.amp fp16 needs a CUDA device; use bf16 or none on CPU")
    return autocast(amp, device), amp
