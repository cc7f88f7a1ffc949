"""Which torch device a computation runs on: the one resolver for the embedding model and the
decoder matmuls."""

from __future__ import annotations


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (False when torch is not installed)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a CUDA device is present, else ``cpu``; anything else unchanged."""
    if device != "auto":
        return device
    return "cuda" if cuda_available() else "cpu"
