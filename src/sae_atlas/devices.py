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


class DeviceError(ValueError):
    """A configured device is not a torch device, or this machine does not have it."""


def check_device(device: str, key: str, *, available_here: bool = True) -> None:
    """Raise :class:`DeviceError` (one line naming the config ``key``) unless ``device`` is "auto"
    or a torch device string and, with ``available_here``, one this process can allocate on."""
    if device == "auto":
        return
    try:
        import torch

        parsed = torch.device(device)
    except ImportError:
        if device != "cpu":
            raise DeviceError(f"{key} = {device!r}: torch is not installed, only 'cpu' or 'auto' can run") from None
        return
    except (RuntimeError, ValueError):
        raise DeviceError(f"{key} = {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if not available_here or parsed.type == "cpu":
        return
    try:
        torch.empty(1, device=parsed)
    except (RuntimeError, AssertionError, ValueError) as error:
        reason = " ".join(str(error).split())[:160]
        raise DeviceError(f"{key} = {device!r} is not available on this machine ({reason})") from None
