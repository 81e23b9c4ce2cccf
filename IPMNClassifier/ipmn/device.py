"""Choosing the torch device from a user's ``--device`` (shared by predict, train and cv)."""

from __future__ import annotations

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
