"""MemoryConfig: which memory, and its sizes and options."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

from memkit.errors import ConfigError

ROPE_MODES = ("absolute", "relative")
EVICT_AGGREGATES = ("token", "frame_mean", "block_mean")
GLOBAL_POSITIONS = ("none", "rope", "learned")
GLOBAL_TIMES = ("none", "rope", "learned")
WRITE_STRENGTHS = ("frame", "token")
#: What a field meant before it existed: a recorded config (a weights file, a saved model's description) that
#: lacks the field was made with this value, which may differ from today's default.
LEGACY = {"global_position": "none", "global_time": "none", "write_strength": "frame"}
ATTENTION_BACKENDS = ("auto", "torch", "naive", "xformers")
SCAN_BACKENDS = ("auto", "torch", "fla", "mamba_ssm")


@dataclass(frozen=True)
class MemoryConfig:
    """Configuration of one memory variant. Each variant reads the fields it needs.

    kind: registry name (``memkit.list_memories()``).
    sink_frames / window_frames: local memory sizes in latent frames.
    horizon_frames: the router's horizon T; positions past it clamp to T.
    evict_aggregate: what an evicted frame writes into the global state:
        "frame_mean" (default) one mean token, "block_mean" one mean token per
        spatial block of a ``blocks x blocks`` grid, "token" every token.
        Gates are per frame and shared by a frame's writes, so time scales do
        not depend on the resolution; only the number of items does (a
        ``head_dim x head_dim`` state holds about ``head_dim`` of them).
    blocks: the spatial grid (``blocks x blocks`` per frame) of "block_mean"
        and of ``hybrid_blockwise``'s per-block states.
    halflife_frames: (shortest, longest) initial retention half-life of the
        global memory's heads, in frames; heads are spread log-uniformly.
    global_position: how the global state's keys, and the queries that read
        it, carry the place in the frame of what they hold, so that a place
        can be looked up again: "learned" (default) rotates them by learned
        phases of their place (a token, or a block of "block_mean"), "rope"
        by the fixed spatial angles of a 3D RoPE, "none" leaves them as the
        cache holds them. With a place code the state holds keys without the
        stream's RoPE, so a lookup does not depend on when the place was seen.
        A "frame_mean" write has no place: there it changes nothing.
    global_time: how the global state's keys carry *when* they were seen:
        "none" (default) not at all; "rope" rotates each write's key by
        its frame's stream index times fixed per-channel frequencies (as a
        RoPE over time) and each reading query by its own frame's, so that
        a query can ask for "what was here L frames ago" (two scenes shown
        at the same places then write different keys); "learned" starts
        from the same frequencies and learns them. Angles add to the place
        code's.
    write_strength: how a frame's write strength (the delta rule's beta)
        is shared by its writes: "frame" (default) each of its ``W`` writes
        uses ``beta / W``, so a frame writes as strongly at any resolution;
        "token" each write uses its token's own ``beta``, so that distinct
        keys (places, times) are each written in full. The decay stays per
        frame in both.
    rope_mode: "absolute" caches keys rotated at their stream positions;
        "relative" rotates [sink | window | chunk] by slot on every read (needs
        ``rope=`` on read/commit/parallel; q, k then arrive un-rotated).
    attention_backend / scan_backend: kernel choice ("auto", "torch", ...).
    check_finite: reject NaN / Inf inputs (one device sync per call).
    """

    kind: str = "hybrid_gdn"
    sink_frames: int = 3
    window_frames: int = 6
    horizon_frames: int = 240
    evict_aggregate: str = "frame_mean"
    blocks: int = 2
    halflife_frames: tuple[float, float] = (1.0, 128.0)
    global_position: str = "learned"
    global_time: str = "none"
    write_strength: str = "frame"
    rope_mode: str = "absolute"
    attention_backend: str = "auto"
    scan_backend: str = "auto"
    check_finite: bool = True

    def __post_init__(self):
        if not isinstance(self.kind, str):
            raise ConfigError(f"MemoryConfig.kind must be a string, got {self.kind!r}")
        for name in ("sink_frames", "window_frames", "horizon_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"MemoryConfig.{name} must be a non-negative int, got {value!r}")
        if not isinstance(self.blocks, int) or isinstance(self.blocks, bool) or self.blocks < 1:
            raise ConfigError(f"MemoryConfig.blocks must be a positive int, got {self.blocks!r}")
        self._check_halflife()
        if self.window_frames < 1:
            raise ConfigError("MemoryConfig.window_frames must be >= 1")
        if self.horizon_frames < 1:
            raise ConfigError("MemoryConfig.horizon_frames must be >= 1")
        if self.rope_mode not in ROPE_MODES:
            raise ConfigError(f"MemoryConfig.rope_mode must be one of {ROPE_MODES}, got {self.rope_mode!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"MemoryConfig.attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if self.scan_backend not in SCAN_BACKENDS:
            raise ConfigError(f"MemoryConfig.scan_backend must be one of {SCAN_BACKENDS}, got {self.scan_backend!r}")
        if self.global_position not in GLOBAL_POSITIONS:
            raise ConfigError(
                f"MemoryConfig.global_position must be one of {GLOBAL_POSITIONS}, got {self.global_position!r}"
            )
        if self.global_time not in GLOBAL_TIMES:
            raise ConfigError(f"MemoryConfig.global_time must be one of {GLOBAL_TIMES}, got {self.global_time!r}")
        if self.write_strength not in WRITE_STRENGTHS:
            raise ConfigError(
                f"MemoryConfig.write_strength must be one of {WRITE_STRENGTHS}, got {self.write_strength!r}"
            )
        if self.evict_aggregate not in EVICT_AGGREGATES:
            raise ConfigError(
                f"MemoryConfig.evict_aggregate must be one of {EVICT_AGGREGATES}, got {self.evict_aggregate!r}"
            )

    def _check_halflife(self):
        value = self.halflife_frames
        try:
            if not isinstance(value, (tuple, list)):
                raise TypeError
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"MemoryConfig.halflife_frames must be (shortest, longest), got {value!r}") from None
        if not (0 < lo <= hi < math.inf) or any(isinstance(v, bool) for v in value):
            raise ConfigError(f"MemoryConfig.halflife_frames must be 0 < shortest <= longest, finite; got {value!r}")
        object.__setattr__(self, "halflife_frames", (lo, hi))  # a list from JSON becomes a tuple

    def to_dict(self) -> dict:
        """The fields as JSON holds them (``halflife_frames`` a list); ``from_dict`` reads it back."""
        return {**asdict(self), "halflife_frames": list(self.halflife_frames)}

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryConfig":
        """A recorded config (``to_dict``'s output). A field it lacks was recorded before the field existed and
        takes the value that meant then (:data:`LEGACY`), else the default."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"MemoryConfig: unknown fields {sorted(unknown)}")
        return cls(**{**LEGACY, **d})

    def fingerprint(self, state_fields: tuple[str, ...], **dims: int) -> str:
        """A short hash of what shapes a state: the kind, the given config fields and the layer's dims."""
        body = {"kind": self.kind, **{k: getattr(self, k) for k in state_fields}, **dims}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
