"""The Team of Experts: E2 (a frozen open_clip vision encoder), E1 (an MLP of the slice ratio), their fusion.

E2 is built from an open_clip architecture name and loaded from a local checkpoint only (never a hub tag). The
loader understands the UniMedCLIP ViT-B/16 training checkpoint (a dict with ``state_dict``, ``module.``
prefixes, a text tower to ignore, optimizer/argument entries that ``torch.load(weights_only=True)`` rejects)
and plain open_clip state dicts. When no checkpoint is configured and ``tiny_fallback`` allows it, a tiny
open_clip ViT is initialised from a seed, saved as a checkpoint and loaded back through the same loader, so
tests and the demo exercise the real code path; its features are not pretrained and the model card says so.

The fusion fixes the reference implementation's degenerate cross-attention (one query, one key: softmax == 1,
so the output ignored the slice position and E1 got no gradient). Here E1 produces several query tokens from a
Fourier encoding of the ratio, E2 provides several key/value tokens (its pooled embedding and a coarse grid of
patch tokens), the attended values are added to the queries, and the resulting token sequence ``c`` is the
cross-attention context of the diffusion UNet.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import logging
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, _build_vision_tower
from torch import nn

from nnqc_pipe.data.io import atomic_path

log = logging.getLogger(__name__)

TINY_ARCHITECTURE = "nnqc-tiny-vit"
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 512, "width": 32, "heads": 2, "layers": 1},
}
# Pickled globals in training checkpoints that are plain data (argparse options, numpy scalars in optimizer
# hyper-parameters); they are allowed explicitly instead of falling back to unsafe unpickling.
BENIGN_GLOBALS = (
    "argparse.Namespace",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray.scalar",
    "numpy.dtype",
    "numpy.dtypes.",
)
INTENSITY_PERCENTILES = (0.5, 99.5)


# ---------------------------------------------------------------------------------------------------
# E2: the frozen vision encoder
# ---------------------------------------------------------------------------------------------------


def model_config(architecture: str) -> dict[str, Any]:
    """The open_clip model config of ``architecture`` (a built-in name or :data:`TINY_ARCHITECTURE`)."""
    if architecture == TINY_ARCHITECTURE:
        return copy.deepcopy(TINY_MODEL_CFG)
    cfg = None if ":" in architecture else open_clip.get_model_config(architecture)
    if cfg is None:
        raise ValueError(
            f"encoder.architecture {architecture!r} is not a local open_clip architecture "
            f"(e.g. ViT-B-16-quickgelu, ViT-B-16 or {TINY_ARCHITECTURE}); hub schemas are not allowed"
        )
    return cfg


def build_vision_tower(architecture: str) -> nn.Module:
    """The image tower of ``architecture`` (open_clip's own builder); returns pooled + patch tokens."""
    cfg = model_config(architecture)
    vision_cfg = dict(cfg["vision_cfg"], output_tokens=True)
    return _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=cfg.get("quick_gelu", False))


def _resolve_global(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _allowed_globals(names: list[str]) -> list[Any]:
    """The objects behind benign global names; numpy scalars also need numpy's dtype classes."""
    allowed = [_resolve_global(name) for name in names]
    if any(name.startswith("numpy") for name in names):
        allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return allowed


def read_pretrained_checkpoint(path: str | Path, allow_unsafe_pickle: bool = False) -> Any:
    """``torch.load`` a checkpoint safely (weights only), handling benign non-tensor entries explicitly.

    Training checkpoints such as UniMedCLIP's carry optimizer hyper-parameters and argument namespaces that
    the weights-only unpickler rejects. Those known plain-data globals are allow-listed; anything else is
    refused unless ``encoder.allow_unsafe_pickle`` is set for a trusted file.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    unknown = [g for g in unsafe if not g.startswith(BENIGN_GLOBALS)]
    if not unknown:
        log.info("checkpoint %s: allowing plain-data globals %s", path, unsafe)
        with torch.serialization.safe_globals(_allowed_globals(unsafe)):
            return torch.load(path, map_location="cpu", weights_only=True)
    if allow_unsafe_pickle:
        log.warning("checkpoint %s: unpickling untrusted globals %s (encoder.allow_unsafe_pickle)", path, unknown)
        return torch.load(path, map_location="cpu", weights_only=False)
    raise ValueError(
        f"checkpoint {path} contains pickled objects {unknown} that are not weights; "
        "set encoder.allow_unsafe_pickle: true only if you trust this file"
    )


def vision_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """Extract the image-tower weights from a UniMedCLIP-style or plain open_clip checkpoint.

    Accepts ``{"state_dict": ...}`` wrappers, DataParallel ``module.`` prefixes and full CLIP state dicts
    (whose ``visual.*`` entries are kept and the text tower dropped); a bare image-tower state dict passes
    unchanged.
    """
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError("checkpoint holds no state dict (expected a dict of tensors or a 'state_dict' entry)")
    state = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    if visual:
        return visual
    if "conv1.weight" in state:
        return state
    raise ValueError("checkpoint has no image-tower weights (no 'visual.*' keys)")


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and values: identifies an encoder independently of its file format."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Initialise the tiny open_clip CLIP (image and text towers) from ``seed``; save its plain state dict."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**model_config(TINY_ARCHITECTURE))
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(model.state_dict(), tmp)
    return Path(path)


@dataclass
class VisionExpert:
    """A frozen image tower plus its preprocessing; :meth:`embed` turns slices into pooled + grid tokens."""

    model: nn.Module
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    token_grid: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Where the tower's weights live."""
        return next(self.model.parameters()).device

    def preprocess(self, slices: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        """CLIP preprocessing of normalised slices [N, H, W]: window to [0, 1], resize, 3 channels, mean/std.

        ``lo``/``hi`` are the subject's intensity percentiles so that all slices of a volume share one window.
        The whole slice is resized (squashed) to the encoder's input size; nothing is cropped away.
        """
        x = ((slices - lo) / max(hi - lo, 1e-6)).clamp(0, 1)[:, None]
        x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x.expand(-1, 3, -1, -1) - mean) / std

    @torch.inference_mode()
    def embed(self, image: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Embed every slice of ``image`` [S, H, W]: pooled [S, D] and patch tokens pooled to [S, G*G, W]."""
        lo, hi = (float(v) for v in np.percentile(image, INTENSITY_PERCENTILES))
        pooled, tokens = [], []
        for start in range(0, image.shape[0], batch_size):
            batch = torch.as_tensor(image[start : start + batch_size], dtype=torch.float32, device=self.device)
            p, t = self.model(self.preprocess(batch, lo, hi))
            pooled.append(p.float().cpu())
            tokens.append(self._pool_tokens(t).float().cpu())
        return torch.cat(pooled).numpy(), torch.cat(tokens).numpy()

    def _pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Average the patch-token grid down to ``token_grid``² tokens (small cache, spatial layout kept)."""
        n, length, width = tokens.shape
        side = math.isqrt(length)
        grid = tokens.transpose(1, 2).reshape(n, width, side, side)
        pooled = F.adaptive_avg_pool2d(grid, self.token_grid)
        return pooled.flatten(2).transpose(1, 2)


def load_vision_expert(expert_cfg: dict[str, Any], device: torch.device, fallback_dir: str | Path) -> VisionExpert:
    """Build E2 from ``expert_cfg`` (the preset's ``encoder`` section) and load its local weights, frozen.

    Without a usable ``checkpoint`` and with ``tiny_fallback`` true, the tiny ViT is saved to
    ``tiny_checkpoint`` (default ``fallback_dir/tiny_vision_expert.pt``) and loaded from there.
    """
    architecture, checkpoint = expert_cfg["architecture"], expert_cfg.get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        if not expert_cfg.get("tiny_fallback", False):
            raise FileNotFoundError(
                f"encoder.checkpoint {checkpoint!r} does not exist; point it at a local UniMedCLIP/open_clip "
                "checkpoint or set encoder.tiny_fallback: true for an untrained tiny encoder"
            )
        architecture = TINY_ARCHITECTURE
        checkpoint = expert_cfg.get("tiny_checkpoint") or Path(fallback_dir) / "tiny_vision_expert.pt"
        if not Path(checkpoint).is_file():
            save_tiny_checkpoint(checkpoint)
        log.warning(
            "encoder: no checkpoint configured (encoder.checkpoint=%r); using the tiny UNTRAINED open_clip "
            "ViT saved at %s — image conditioning carries no pretrained knowledge",
            expert_cfg.get("checkpoint"),
            checkpoint,
        )
    model = build_vision_tower(architecture)
    weights = vision_state_dict(read_pretrained_checkpoint(checkpoint, expert_cfg.get("allow_unsafe_pickle", False)))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"encoder checkpoint {checkpoint} does not match architecture {architecture!r} "
            f"(check encoder.architecture): {str(exc)[:500]}"
        ) from exc
    model.eval().requires_grad_(False).to(device)
    pre = model_config(architecture).get("preprocess_cfg", {})
    info = {
        "architecture": architecture,
        "checkpoint": str(checkpoint),
        "weights_sha256": weights_sha256(weights),
        "pretrained": architecture != TINY_ARCHITECTURE,
        "token_grid": int(expert_cfg.get("token_grid", 4)),
    }
    return VisionExpert(
        model=model,
        image_size=tuple(model.image_size),
        mean=tuple(pre.get("mean", OPENAI_DATASET_MEAN)),
        std=tuple(pre.get("std", OPENAI_DATASET_STD)),
        token_grid=info["token_grid"],
        info=info,
    )


# ---------------------------------------------------------------------------------------------------
# E1 and the fusion
# ---------------------------------------------------------------------------------------------------


class PositionExpert(nn.Module):
    """E1: an MLP of a Fourier encoding of the slice ratio, emitting ``n_tokens`` query tokens."""

    def __init__(self, d_model: int, n_tokens: int, n_fourier: int) -> None:
        super().__init__()
        self.n_tokens, self.d_model = n_tokens, d_model
        self.register_buffer("freqs", math.pi * torch.arange(1, n_fourier + 1, dtype=torch.float32))
        self.mlp = nn.Sequential(
            nn.Linear(2 * n_fourier + 1, d_model),
            nn.SiLU(),
            nn.Linear(d_model, d_model),
            nn.SiLU(),
            nn.Linear(d_model, n_tokens * d_model),
        )

    def forward(self, ratio: torch.Tensor) -> torch.Tensor:
        """Slice ratios [B] in [0, 1] -> tokens [B, n_tokens, d_model]."""
        r = ratio.float()[:, None]
        features = torch.cat([r, torch.sin(r * self.freqs), torch.cos(r * self.freqs)], dim=1)
        return self.mlp(features).view(-1, self.n_tokens, self.d_model)


class TeamOfExperts(nn.Module):
    """Fuses E1 (slice position) and cached E2 features (image) into the UNet context ``c`` [B, n_queries, d].

    Modes (the paper's ablations): ``none`` (a learned constant context), ``image`` (learned queries attend to
    the image tokens), ``position`` (E1 tokens only) and ``full`` (E1 queries attend to the image tokens;
    queries F_Q from E1, keys/values F_K/F_V from E2).
    """

    def __init__(
        self,
        mode: str,
        d_model: int,
        n_queries: int,
        n_heads: int,
        n_fourier: int,
        pooled_dim: int,
        token_dim: int,
        n_tokens: int,
    ) -> None:
        super().__init__()
        self.mode = mode
        if self.uses_position:
            self.e1 = PositionExpert(d_model, n_queries, n_fourier)
        else:
            self.queries = nn.Parameter(0.02 * torch.randn(n_queries, d_model))
        if self.uses_image:
            self.key_pooled = nn.Linear(pooled_dim, d_model)
            self.key_tokens = nn.Linear(token_dim, d_model)
            self.key_position = nn.Parameter(0.02 * torch.randn(n_tokens + 1, d_model))
            self.norm_q = nn.LayerNorm(d_model)
            self.norm_kv = nn.LayerNorm(d_model)
            self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.ffn = nn.Sequential(
            nn.LayerNorm(d_model), nn.Linear(d_model, 2 * d_model), nn.SiLU(), nn.Linear(2 * d_model, d_model)
        )

    @property
    def uses_image(self) -> bool:
        """Whether E2 embeddings are needed (modes ``image`` and ``full``)."""
        return self.mode in ("image", "full")

    @property
    def uses_position(self) -> bool:
        """Whether E1 is used (modes ``position`` and ``full``)."""
        return self.mode in ("position", "full")

    def forward(
        self,
        ratio: torch.Tensor,
        pooled: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        keep_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Context tokens for a batch: ``ratio`` [B], ``pooled`` [B, D] and ``tokens`` [B, N, W] from E2.

        ``keep_image`` [B] (bool): where False the image's contribution is left out, so the context is the one of
        an image-free sample (image dropout in training, the unconditional branch of image guidance).
        """
        batch = ratio.shape[0]
        queries = self.e1(ratio) if self.uses_position else self.queries.expand(batch, -1, -1)
        context = queries
        if self.uses_image:
            if pooled is None or tokens is None:
                raise ValueError(f"conditioning mode {self.mode!r} needs the image embeddings (pooled and tokens)")
            keys = torch.cat([self.key_pooled(pooled.float())[:, None], self.key_tokens(tokens.float())], dim=1)
            keys = self.norm_kv(keys + self.key_position)
            attended, _ = self.attn(self.norm_q(queries), keys, keys, need_weights=False)
            if keep_image is not None:
                attended = attended * keep_image.to(attended.dtype)[:, None, None]
            context = queries + attended
        return context + self.ffn(context)
