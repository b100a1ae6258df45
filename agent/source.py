"""Sources: the one seam through which samples and events enter the agent.

Placeholder; the contract follows in the next commit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from cngmrv.native import Window


class FrameDecoder(ABC):
    """The pure half of a source that reads the vehicle's CAN bus."""

    channels: tuple[str, ...] = ()

    @abstractmethod
    def on_frame(self, t: float, can_id: int, data: bytes, mono: float) -> None: ...

    def annotate(self, reading: dict[str, Any], w: Window) -> None:
        return None
