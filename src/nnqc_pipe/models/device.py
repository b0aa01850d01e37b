"""Device selection, seeding and mixed precision for the training and sampling code.

Every model must run on CPU and GPU; the only precision trick is bf16 autocast for the diffusion UNet on
CUDA (the autoencoder always stays in fp32: fp16/bf16 autoencoders with small norm eps produce NaN).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto``/``cpu``/``cuda`` (or ``cuda:N``) to a :class:`torch.device`.

    ``auto`` picks CUDA when it is available; asking for CUDA on a machine without it is an error rather than
    a silent fall-back, so a cluster job that lost its GPU fails loudly instead of running for days on CPU.
    """
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {name!r} was requested but CUDA is not available on this machine "
                "(set device: auto or cpu in the config to run on CPU)"
            )
        return torch.device(name)
    raise ValueError(f"unknown device {name!r}; expected one of {DEVICE_CHOICES} (or cuda:N)")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so that runs are repeatable."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def unet_autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA, nothing on CPU (CPU bf16 is slow and gains nothing here)."""
    if device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
