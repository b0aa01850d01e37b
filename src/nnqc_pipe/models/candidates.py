"""Training candidates of the learned QC opinion (rule ``learned_candidates``), all on the preprocessed grid.

Of one labelled training subject:

- ``gt``: the ground truth itself (a perfect mask must be recognised as one);
- ``segmenter_e{epoch}``: the fold's segmenter, which never saw the subject, at each checkpoint epoch;
- ``seggen_{i}``: "SegGen", the ground truth under a random in-plane affine (rotation, translation, scaling) and
  elastic deformation of random strength (MONAI ``RandAffine`` and ``Rand2DElastic``, one transform for the
  whole stack);
- ``degraded_L{level}_{i}``: the pipeline's own degradations at a drawn level
  (:func:`nnqc_pipe.degrade.degrade_volume`);
- ``source_{name}``: every user source with a mask for the subject.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
from monai.transforms import Rand2DElastic, RandAffine

from nnqc_pipe.data.preprocess import Preprocessed, patch_spacing
from nnqc_pipe.degrade import degrade_volume

# Largest SegGen transform (at strength 1): rotation (rad), translation (fraction of the patch), scaling, elastic.
SEGGEN_MAX = {"rotate": 0.35, "translate": 0.06, "scale": 0.2, "elastic_magnitude": 3.0, "elastic_spacing": 12}


def _rng(seed: int, subject: str, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(subject.encode()), zlib.crc32(stream.encode())])


def seggen(label: np.ndarray, strength: float, seed: int) -> np.ndarray:
    """The class-index stack [S, H, W] under one random in-plane affine + elastic deformation of ``strength`` in
    [0, 1] (nearest-neighbour; the same transform for every slice, so the volume stays coherent)."""
    patch = max(label.shape[1:])
    affine = RandAffine(prob=1.0, rotate_range=(SEGGEN_MAX["rotate"] * strength,),
                        translate_range=(SEGGEN_MAX["translate"] * strength * patch,) * 2,
                        scale_range=(SEGGEN_MAX["scale"] * strength,) * 2, mode="nearest", padding_mode="zeros")
    elastic = Rand2DElastic(spacing=(SEGGEN_MAX["elastic_spacing"],) * 2,
                            magnitude_range=(0.0, SEGGEN_MAX["elastic_magnitude"] * strength), prob=1.0,
                            mode="nearest", padding_mode="zeros")
    affine.set_random_state(seed=seed % 2**32)
    elastic.set_random_state(seed=(seed + 1) % 2**32)
    moved = elastic(affine(label.astype(np.float32)))
    return np.rint(np.asarray(moved)).astype(np.uint8)


def make_candidates(pre: Preprocessed, predictions: Mapping[str, np.ndarray], user: Mapping[str, np.ndarray],
                    n_seggen: int, n_degraded: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """(kind, class-index patch stack) of every training candidate of one labelled subject (see the module)."""
    if pre.label is None:
        raise ValueError(f"subject {pre.record['subject']}: training candidates need the ground truth")
    subject, label = pre.record["subject"], pre.label.astype(np.uint8)
    out = [("gt", label)]
    out += [(f"segmenter_e{epoch}", mask.astype(np.uint8)) for epoch, mask in sorted(predictions.items())]
    rng = _rng(seed, subject, "seggen")
    for i in range(n_seggen):
        out.append((f"seggen_{i}", seggen(label, float(rng.uniform(0.1, 1.0)), int(rng.integers(2**31)))))
    rng = _rng(seed, subject, "degraded")
    spacing = patch_spacing(pre.record)
    for i in range(n_degraded):
        level = int(rng.choice([2, 3, 4, 5, 5]))
        mask, _, _ = degrade_volume(label, spacing, pre.record["n_classes"], level, rng, slice_axis=0)
        out.append((f"degraded_L{level}_{i}", mask.astype(np.uint8)))
    out += [(f"source_{name}", mask.astype(np.uint8)) for name, mask in sorted(user.items())]
    return out
