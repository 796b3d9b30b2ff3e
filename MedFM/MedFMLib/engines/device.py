"""Choosing the compute device: CUDA, then Apple MPS, then the CPU."""

from __future__ import annotations

from ..errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(requested: str = "auto") -> str:
    """Turn 'auto', 'cpu', 'cuda' or 'mps' into a device that torch can use here."""
    requested = (requested or "auto").lower()
    if requested not in DEVICE_CHOICES and not requested.startswith("cuda:"):
        raise DeviceError(f"Unknown device '{requested}': use one of {', '.join(DEVICE_CHOICES)}.")
    if requested == "cpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        if requested == "auto":
            return "cpu"
        raise DeviceError(f"Device '{requested}' needs PyTorch, which is not installed.") from None

    cuda_ok = torch.cuda.is_available()
    mps_ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if requested == "auto":
        return "cuda" if cuda_ok else "mps" if mps_ok else "cpu"
    if requested.startswith("cuda") and not cuda_ok:
        raise DeviceError(
            f"CUDA was requested but PyTorch {torch.__version__} sees no CUDA GPU; use --device cpu or auto."
        )
    if requested == "mps" and not mps_ok:
        raise DeviceError("Apple MPS was requested but is not available here; use --device cpu or auto.")
    return requested
