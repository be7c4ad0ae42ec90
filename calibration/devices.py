"""`--device` for calibrate and eval: validated where the arguments arrive, resolved in one place."""

from typing import Annotated

import torch
from pydantic import AfterValidator


def _available(device: str) -> str:
    if device == "auto":
        return device
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{device!r} asked for, but this machine has no usable CUDA GPU; use --device cpu or auto")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


# "auto" (a GPU if there is one, else the CPU), "cpu", "cuda" or "cuda:N" that exists on this machine.
Device = Annotated[str, AfterValidator(_available)]


def resolve_device(device: str) -> str:
    """The torch device for a validated `Device`."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
