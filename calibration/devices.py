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


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation on `device` can take now (a CUDA device's free memory; on the CPU, Linux's
    MemAvailable); 0 where it cannot be read, so callers treat an unknown as no room."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
