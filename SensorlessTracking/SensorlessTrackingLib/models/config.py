"""Model configuration (no torch here, so the command line can read it without torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

__all__ = ["ModelConfig", "MODEL_NAMES", "GLOBAL_ONLY_FIELDS"]

#: Learned models; "decorrelation" (no learning) lives in :mod:`..decorrelation`.
MODEL_NAMES = ("dualtrack", "moglo", "pairwise")

#: What only dualtrack's global encoder and its fusion read: a local-only model ignores them.
GLOBAL_ONLY_FIELDS = ("use_global", "max_global_tokens", "global_size", "global_layers", "heads", "global_drop")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and input geometry of a tracking model (stored in every checkpoint).

    The defaults are the shipped model's (96 x 96 pixels of 0.3 mm, a CPU-sized DualTrack).

    Input geometry
    --------------
    image_size : (rows, cols) of the model input, pixels
    pixel_spacing_mm : isotropic pixel spacing the frames are resampled to before the model
    clip_length : frames per training clip / inference window (>= 2; pairwise uses 2 per pair)

    Width
    -----
    channels : channel widths of the convolutional encoders (stem first)
    token_dim : feature size per frame (tokens of the attention layers, LSTM input)

    DualTrack
    ---------
    use_global : False = the local-only ablation (no global encoder, no fusion)
    pair_radius : dualtrack: > 0 adds the local correlation of consecutive frames (displacements
        up to this many pixels) to the local encoder; 0 = plain learned features (the other
        models ignore it)
    pair_gaps : dualtrack: the frame distances of those correlations, e.g. ``(1,)`` (each frame
        with the next) or ``(1, 2, 3)``; a longer gap sees a larger elevational step, which
        keeps slow motion above the speckle's decorrelation noise
    global_size : side of the downsampled frames of the global encoder, pixels
    max_global_tokens : frames of the whole sweep the global encoder sees (every k-th frame)
    global_layers, heads : temporal self-attention depth and heads
    global_drop : dualtrack, training only: probability that a training clip is decoded without the
        global fusion (drop-path; the kept ones are scaled by 1 / (1 - p)); inference always fuses.
        A regulariser: with a few dozen training sweeps the sweep-level context can recognise a
        training sweep, and the model leans on it. 0 = off. It changes no weights, so a checkpoint
        can be fine-tuned with another value.

    MoGLo
    -----
    corr_radius : displacement radius of the correlation between consecutive feature maps
    lstm_hidden : hidden size of the LSTM motion estimator

    Targets
    -------
    target_scale : typical magnitude of each frame-to-frame parameter (tx, ty, tz mm,
        rx, ry, rz deg); the network predicts parameters divided by it
    """

    name: str = "dualtrack"
    image_size: tuple[int, int] = (96, 96)
    pixel_spacing_mm: float = 0.3
    clip_length: int = 16
    channels: tuple[int, ...] = (16, 24, 32, 48)
    token_dim: int = 96
    use_global: bool = True
    pair_radius: int = 2
    pair_gaps: tuple[int, ...] = (1,)
    global_size: int = 48
    max_global_tokens: int = 16
    global_layers: int = 2
    heads: int = 4
    global_drop: float = 0.0
    corr_radius: int = 3
    lstm_hidden: int = 128
    target_scale: tuple[float, ...] = (0.1, 0.1, 0.4, 0.3, 0.3, 0.3)

    def __post_init__(self):
        if self.name not in MODEL_NAMES:
            raise ValueError(f"ModelConfig.name must be one of {MODEL_NAMES}, got {self.name!r}")
        size = tuple(int(v) for v in self.image_size)
        if len(size) != 2 or min(size) < 16 or any(v % 16 for v in size):
            raise ValueError(f"ModelConfig.image_size must be two multiples of 16 (>= 16), got {self.image_size}")
        object.__setattr__(self, "image_size", size)
        if not self.pixel_spacing_mm > 0:
            raise ValueError(f"ModelConfig.pixel_spacing_mm must be positive, got {self.pixel_spacing_mm}")
        if int(self.clip_length) < 2:
            raise ValueError(f"ModelConfig.clip_length must be >= 2, got {self.clip_length}")
        if len(self.target_scale) != 6 or min(self.target_scale) <= 0:
            raise ValueError(f"ModelConfig.target_scale must be 6 positive numbers, got {self.target_scale}")
        gaps = tuple(int(g) for g in self.pair_gaps)
        if not gaps or min(gaps) < 1 or len(set(gaps)) != len(gaps) or max(gaps) >= int(self.clip_length):
            raise ValueError(f"ModelConfig.pair_gaps must be distinct frame distances from 1 to clip_length - 1 "
                             f"({int(self.clip_length) - 1}), got {self.pair_gaps}")
        object.__setattr__(self, "pair_gaps", gaps)
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "target_scale", tuple(float(v) for v in self.target_scale))
        if not 0.0 <= float(self.global_drop) < 1.0:
            raise ValueError(f"ModelConfig.global_drop must be a probability in [0, 1), got {self.global_drop}")
        object.__setattr__(self, "global_drop", float(self.global_drop))
        if int(self.max_global_tokens) < 1:
            raise ValueError(f"ModelConfig.max_global_tokens must be >= 1 (frames of the sweep), got {self.max_global_tokens}")
        if self.token_dim % self.heads:
            raise ValueError(f"ModelConfig.token_dim ({self.token_dim}) must be divisible by heads ({self.heads})")

    def local_part(self) -> dict:
        """The fields that are not the global encoder's (:data:`GLOBAL_ONLY_FIELDS`). Two dualtrack
        configs with equal local parts have the same input, local encoder and motion head: a
        global model and its local-only ablation."""
        return {k: v for k, v in self.to_dict().items() if k not in GLOBAL_ONLY_FIELDS}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["channels"] = list(self.channels)
        d["target_scale"] = list(self.target_scale)
        d["pair_gaps"] = list(self.pair_gaps)
        return d

    @staticmethod
    def from_dict(d: dict) -> ModelConfig:
        known = {f.name for f in fields(ModelConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}")
        d = dict(d)
        for key in ("image_size", "channels", "target_scale", "pair_gaps"):
            if key in d:
                d[key] = tuple(d[key])
        return ModelConfig(**d)
