"""Tracking models: ``dualtrack``, ``moglo``, ``pairwise`` (PyTorch).

Every model maps a clip of frames ``(batch, T, rows, cols)`` (float32, model spacing) to
frame-to-frame poses ``(batch, T - 1, 6)`` (mm, degrees; see :mod:`..pose`) and returns tensors
only. :class:`ModelConfig` needs no torch; :func:`build_model` imports it.
"""

from .config import MODEL_NAMES, ModelConfig

__all__ = ["ModelConfig", "MODEL_NAMES", "build_model"]


def build_model(config: ModelConfig):
    """The ``torch.nn.Module`` described by ``config``."""
    if config.name == "dualtrack":
        from .dualtrack import DualTrack

        return DualTrack(config)
    if config.name == "moglo":
        from .moglo import MoGLo

        return MoGLo(config)
    from .pairwise import Pairwise

    return Pairwise(config)
