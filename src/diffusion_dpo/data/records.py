"""The one normalised record every preference source produces.

Convention (used everywhere in the toolkit): `chosen` is the preferred image ("winner", w),
`rejected` the other ("loser", l). Images stay encoded (bytes or a path) until a worker decodes them,
so sources of any size can be indexed without loading their pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

ImageRef = Union[bytes, str, Path]
"""Encoded image bytes (JPEG/PNG/WebP ...) or a path to an image file."""


@dataclass(frozen=True)
class PairRecord:
    prompt: str
    chosen: ImageRef
    rejected: ImageRef
    key: str
    """Stable identifier of the pair inside its source (row index, ranking_id, file name...)."""
    meta: dict = field(default_factory=dict, compare=False)
    """Optional extra fields carried along (scores, model names, seeds)."""


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image (Diffusion-KTO's data): a prompt, an image and whether it is desirable."""

    prompt: str
    image: ImageRef
    desirable: bool
    key: str
    """Stable identifier inside its source (manifest line, or the pair key plus /chosen or /rejected)."""
    meta: dict = field(default_factory=dict, compare=False)
