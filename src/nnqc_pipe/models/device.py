"""Device selection, seeding and mixed precision for the training and sampling code.

Every model must run on CPU and GPU; the only precision trick is bf16 autocast for the diffusion UNet on
CUDA (the autoencoder always stays in fp32: fp16/bf16 autoencoders with small norm eps produce NaN).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import socket
from collections.abc import Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceUnavailableError(RuntimeError):
    """CUDA was asked for (``device: cuda``, or a GPU job of the cluster profile) on a host without it."""


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto``/``cpu``/``cuda`` (or ``cuda:N``) to a :class:`torch.device`.

    ``auto`` picks CUDA when it is available and otherwise falls back to the CPU with a logged warning. Asking for
    CUDA on a host without it raises :class:`DeviceUnavailableError` naming the host, rather than falling back, so
    a cluster job that landed on a node without a usable GPU fails at once instead of running for days on its CPU.
    """
    name = str(name).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        _warn_cpu_fallback()
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {name!r} was requested but CUDA is not available on host {socket.gethostname()!r} "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}, torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); on a cluster, check that the "
                "GPU partition gives this job a GPU; to run on the CPU set device: cpu in the config"
            )
        return torch.device(name)
    raise ValueError(f"unknown device {name!r}; expected one of {DEVICE_CHOICES} (or cuda:N)")


@functools.cache
def _warn_cpu_fallback() -> None:
    """Log once per process that ``device: auto`` runs on the CPU."""
    log.warning("device auto: no CUDA on host %s, running on the CPU", socket.gethostname())


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
