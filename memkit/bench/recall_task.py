"""The recall task of ``memkit bench recall``: frames that show scenes, then distractors, then queries for the scenes.

Each frame is a ``rows x cols`` grid of tokens; a token is a symbol (its content) and its frame's cue:

* a *scene* frame holds random symbols at every place and a cue naming the scene (a code drawn per stream from
  ``cues`` codes);
* a *distractor* frame holds random symbols and no cue;
* a *query* frame, ``lag`` frames after its scene, holds the query symbol at every place and the scene's cue. Its
  target is the scene's symbol at each place: the memory must find the scene by its cue and each place by
  where the querying token sits (RoPE, as in a video model: no token carries its position).

The first ``sink_frames`` frames are distractors, so that no scene sits in a sink; scenes follow one per frame,
then distractors, then the queries in the scenes' order, so every query is exactly ``lag`` frames after its
scene.

With ``address="time"`` (a return in a video: the same places, told apart only by when they were shown) every
scene carries the same mark instead of a cue of its own, and a query names the scene it asks for by its lag alone:
a lag code (how many frames back) on the query frame. The queries come in a random order per stream, one per frame
from ``lag`` frames after the first scene, so their lags vary from query to query (within ``lag +- (scenes - 1)``)
and neither the order nor a fixed lag tells which scene is asked for.

A model of the smallest learned parts around one memory layer (embeddings, q/k/v with Wan's q/k RMSNorm, the
memory, an output projection and a read-out head) answers the queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from memkit.errors import ConfigError

VARIANTS = ("full", "window", "sink_window", "hybrid_gdn", "hybrid_ssd", "hybrid_blockwise")
IGNORE = -100  # target of every token that is not a query
ADDRESSES = ("cue", "time")


@dataclass(frozen=True)
class RecallSetup:
    """Sizes and budget of one run. The defaults are the documented run (docs/benchmarks.md, "Recall")."""

    rows: int = 4
    cols: int = 4
    vocab: int = 16               # symbols; recall by chance is 1 / vocab
    cues: int = 32                # scene codes a stream draws its scenes' cues from
    scenes: tuple[int, ...] = (1, 2)          # scenes held at once in training, one of them per batch
    eval_scenes: tuple[int, ...] = (1, 2, 4)  # capacity: scenes held at once in evaluation
    sink_frames: int = 1
    window_frames: int = 2
    chunk_frames: int = 3
    multiples: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # evaluated lags, in local memories (sink + window)
    heads: int = 2
    head_dim: int = 32
    dim: int = 64
    layers: int = 1
    batch: int = 16
    steps: int = 800
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    warmup_steps: int = 50
    eval_streams: int = 64
    seed: int = 0
    address: str = "cue"          # how a query names its scene: by the scene's cue, or by its lag ("time")

    def __post_init__(self):
        for name in ("rows", "cols", "vocab", "cues", "window_frames", "chunk_frames", "heads", "head_dim", "dim",
                     "layers", "batch", "steps", "eval_streams"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"recall setup: {name} must be a positive int, got {value!r}")
        if self.sink_frames < 0:
            raise ConfigError(f"recall setup: sink_frames must be >= 0, got {self.sink_frames}")
        if self.vocab < 2:
            raise ConfigError(f"recall setup: vocab must be at least 2 symbols, got {self.vocab}")
        for name in ("scenes", "eval_scenes", "multiples", "lrs"):
            values = getattr(self, name)
            if not values or any(not v > 0 for v in values):
                raise ConfigError(f"recall setup: {name} must be positive values, got {values!r}")
        if max(*self.scenes, *self.eval_scenes) > self.cues:
            raise ConfigError(f"recall setup: {max(*self.scenes, *self.eval_scenes)} scenes at once need as many "
                              f"cues, but there are {self.cues}")
        if self.address not in ADDRESSES:
            raise ConfigError(f"recall setup: address must be one of {ADDRESSES}, got {self.address!r}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError(f"recall setup: head_dim must be even and >= 6 (3D RoPE), got {self.head_dim}")

    @property
    def frame_tokens(self) -> int:
        return self.rows * self.cols

    @property
    def local_frames(self) -> int:
        """Frames a bounded memory holds: sink + window (``window`` gets them all as window)."""
        return self.sink_frames + self.window_frames

    @property
    def lags(self) -> list[int]:
        return [m * self.local_frames for m in self.multiples]

    @property
    def chance(self) -> float:
        return 1.0 / self.vocab

    @property
    def lag_codes(self) -> int:
        """The lag codes a query of ``address="time"`` can carry: 1 .. the longest lag of any query."""
        return self.lags[-1] + max(*self.scenes, *self.eval_scenes)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RecallSetting:
    """One memory configuration under test."""

    memory: str
    evict_aggregate: str = "token"
    rope_mode: str = "relative"
    global_position: str = "learned"
    blocks: int = 2
    global_time: str = "none"
    write_strength: str = "frame"
    #: per-block designs that scale with the frame: ``blocks`` chosen per token grid for about this many tokens per
    #: block (see :func:`block_count`); None: ``blocks`` as given
    block_tokens: int | None = None

    def blocks_for(self, rows: int, cols: int) -> int:
        return self.blocks if self.block_tokens is None else block_count(rows, cols, self.block_tokens)

    @property
    def hybrid(self) -> bool:
        return self.memory.startswith("hybrid")

    @property
    def name(self) -> str:
        if not self.hybrid:
            return self.memory
        parts = [self.memory, self.evict_aggregate]
        if self.block_tokens is not None:
            parts.append(f"~{self.block_tokens}/block")
        elif self.memory == "hybrid_blockwise" or self.evict_aggregate == "block_mean":
            parts.append(f"{self.blocks}x{self.blocks}")
        parts.append(self.rope_mode)
        if self.places:
            parts.append(f"place:{self.global_position}")
        if self.global_time != "none":
            parts.append(f"time:{self.global_time}")
        if self.write_strength != "frame":
            parts.append(f"strength:{self.write_strength}")
        return " ".join(parts)

    @property
    def places(self) -> bool:
        """Whether this setting's global writes have places, so that ``global_position`` applies."""
        return self.evict_aggregate == "token" or (self.evict_aggregate == "block_mean"
                                                   and self.memory != "hybrid_blockwise")

    def config(self, setup: RecallSetup):
        from memkit.memory import MemoryConfig

        # `window` gets the sink's frames too: every bounded memory holds the same number of frames
        window = setup.window_frames + (setup.sink_frames if self.memory == "window" else 0)
        extra = {}
        if self.hybrid:
            extra = dict(evict_aggregate=self.evict_aggregate, global_position=self.global_position,
                         blocks=self.blocks_for(setup.rows, setup.cols), global_time=self.global_time,
                         write_strength=self.write_strength)
        return MemoryConfig(kind=self.memory, sink_frames=setup.sink_frames, window_frames=window,
                            rope_mode=self.rope_mode, horizon_frames=4 * setup.lags[-1], check_finite=False, **extra)

    def to_dict(self) -> dict:
        hybrid = self.hybrid
        return {"name": self.name, "memory": self.memory, "evict_aggregate": self.evict_aggregate if hybrid else None,
                "rope_mode": self.rope_mode,
                "global_position": self.global_position if hybrid and self.places else None,
                "blocks": self.blocks if hybrid else None,
                "block_tokens": self.block_tokens if hybrid else None,
                "global_time": self.global_time if hybrid else None,
                "write_strength": self.write_strength if hybrid else None}


def block_count(rows: int, cols: int, block_tokens: int) -> int:
    """The ``blocks`` (a ``blocks x blocks`` grid) that gives a ``rows x cols`` token grid about ``block_tokens``
    tokens per block."""
    return max(1, min(rows, cols, round(math.sqrt(rows * cols / block_tokens))))


# -- streams ---------------------------------------------------------------------------------------------
@dataclass
class RecallBatch:
    symbols: torch.Tensor   # (B, frames, tokens) long; the query symbol is ``vocab``
    cues: torch.Tensor      # (B, frames) long; 0: no scene
    targets: torch.Tensor   # (B, frames, tokens) long; IGNORE except at queries
    lags: torch.Tensor      # (B, frames) long; a query's lag code with address="time", else 0
    scene_frames: list[int] = field(default_factory=list)
    query_frames: list[int] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return self.symbols.shape[1]


def stream_layout(setup: RecallSetup, scenes: int, lag: int) -> tuple[list[int], list[int], int]:
    """The scene frames, the query frames (with ``address="cue"`` query ``i`` asks for scene ``i``; with "time"
    each stream asks them in an order of its own) and the stream's length in frames."""
    if lag < scenes:
        raise ConfigError(f"a lag of {lag} frames cannot separate {scenes} consecutive scenes from their queries")
    first = setup.sink_frames  # the sink holds distractors only
    scene_frames = [first + i for i in range(scenes)]
    query_frames = [f + lag for f in scene_frames]
    return scene_frames, query_frames, query_frames[-1] + 1


def make_streams(setup: RecallSetup, gen: torch.Generator, batch: int, scenes: int, lag: int) -> RecallBatch:
    """``batch`` streams holding ``scenes`` scenes, each queried ``lag`` frames after it was shown (with
    ``address="time"``: ``lag`` frames after the first scene the queries start, one per frame, in a random order
    per stream, each naming its scene by its lag)."""
    scene_frames, query_frames, frames = stream_layout(setup, scenes, lag)
    T = setup.frame_tokens
    symbols = torch.randint(0, setup.vocab, (batch, frames, T), generator=gen)
    cues = torch.zeros(batch, frames, dtype=torch.long)
    lags = torch.zeros(batch, frames, dtype=torch.long)
    targets = torch.full((batch, frames, T), IGNORE, dtype=torch.long)
    rows = torch.arange(batch)
    if setup.address == "time":
        asked = torch.stack([torch.randperm(scenes, generator=gen) for _ in range(batch)])  # (B, queries)
    else:
        asked = torch.arange(scenes).expand(batch, scenes)
        codes = torch.stack([torch.randperm(setup.cues, generator=gen)[:scenes] + 1 for _ in range(batch)])
    for i, s in enumerate(scene_frames):
        cues[:, s] = 1 if setup.address == "time" else codes[:, i]
    scene_at = torch.tensor(scene_frames)
    for j, q in enumerate(query_frames):
        shown = scene_at[asked[:, j]]  # (B,) the frame of the scene each stream's query j asks for
        targets[:, q] = symbols[rows, shown]
        if setup.address == "time":
            lags[:, q] = q - shown
        else:
            cues[:, q] = codes[:, j]
    for q in query_frames:
        symbols[:, q] = setup.vocab
    return RecallBatch(symbols, cues, targets, lags, scene_frames, query_frames)


def training_lag(setup: RecallSetup, gen: torch.Generator, scenes: int) -> int:
    """A lag drawn from ``[scenes, longest evaluated lag]`` frames: log-uniformly where queries name their scene by
    its cue (as many short lags, the window's work, as long ones, the global memory's, per octave); uniformly
    where they name it by its lag (``address="time"``), so that every lag code is learned from as many queries."""
    lo, hi = scenes, setup.lags[-1]
    if setup.address == "time":
        return int(torch.randint(lo, hi + 1, (), generator=gen))
    return int(round(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand((), generator=gen).item())))


class RecallStreams(torch.utils.data.IterableDataset):
    """Endless training batches: per batch a number of scenes from ``setup.scenes`` and a :func:`training_lag`."""

    def __init__(self, setup: RecallSetup, seed: int):
        super().__init__()
        self.setup, self.seed = setup, seed

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            scenes = self.setup.scenes[int(torch.randint(len(self.setup.scenes), (), generator=gen))]
            batch = make_streams(self.setup, gen, self.setup.batch, scenes, training_lag(self.setup, gen, scenes))
            yield batch.symbols, batch.cues, batch.lags, batch.targets


def reach(setup: RecallSetup, memory, scenes: int, lag: int) -> float:
    """The share of the queried scenes that one layer's local attention can see: the scene is among the frames the
    memory holds before its query's chunk, or in that chunk (with ``address="time"``, where any query may ask for
    any scene, averaged over every pair)."""
    scene_frames, query_frames, _ = stream_layout(setup, scenes, lag)
    F = setup.chunk_frames
    pairs = (list(zip(scene_frames, query_frames)) if setup.address == "cue"
             else [(s, q) for s in scene_frames for q in query_frames])
    seen = [s >= q - q % F or s in memory.held_frames(q - q % F) for s, q in pairs]
    return sum(seen) / len(seen)


# -- the model around the memory ----------------------------------------------------------------------------
class RecallLayer(nn.Module):
    """q, k, v from the residual stream (with Wan's RMSNorm on q and k), the memory, an output projection."""

    def __init__(self, setup: RecallSetup, cfg):
        super().__init__()
        from memkit.memory import build_memory

        H, D = setup.heads, setup.head_dim
        self.heads, self.head_dim = H, D
        self.qkv = nn.Linear(setup.dim, 3 * H * D)
        self.norm_q, self.norm_k = nn.RMSNorm(D), nn.RMSNorm(D)
        self.memory = build_memory(cfg, num_heads=H, head_dim=D, dim=setup.dim, frame_tokens=setup.frame_tokens,
                                   frame_shape=(setup.rows, setup.cols))
        self.out = nn.Linear(H * D, setup.dim)

    def qkv_of(self, x: torch.Tensor):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)
        return self.norm_q(q), self.norm_k(k), v


class LagCode(nn.Module):
    """The embedding of a query's lag code ``L`` (frames back; 0: no query): a learned projection of sinusoids of
    ``L`` at frequencies from 2 radians per frame down to one turn per four longest lags, plus a learned vector per
    code (zero at init). Neighbouring lags start with neighbouring embeddings, so that what is learned of one lag
    carries to the next (a table alone learns each lag from its own queries only)."""

    def __init__(self, codes: int, dim: int, frequencies: int = 16):
        super().__init__()
        omega = torch.logspace(math.log10(2.0), math.log10(2 * math.pi / (4 * codes)), frequencies)
        angles = torch.arange(codes + 1, dtype=torch.float32)[:, None] * omega
        features = torch.cat([angles.cos(), angles.sin()], dim=1)
        features[0] = 0  # code 0: not a query
        self.register_buffer("features", features, persistent=False)
        self.project = nn.Linear(2 * frequencies, dim, bias=False)
        self.table = nn.Embedding(codes + 1, dim)
        nn.init.zeros_(self.table.weight)

    def forward(self, lags: torch.Tensor) -> torch.Tensor:
        return self.project(self.features[lags]) + self.table(lags)


class RecallNet(nn.Module):
    def __init__(self, setup: RecallSetup, cfg):
        super().__init__()
        from memkit.ops import Rope3D

        self.setup = setup
        self.symbols = nn.Embedding(setup.vocab + 1, setup.dim)  # the last one is the query symbol
        self.cues = nn.Embedding(setup.cues + 1, setup.dim)       # 0: no scene
        # address="time": a query's lag code (0: none)
        self.lags = LagCode(setup.lag_codes, setup.dim) if setup.address == "time" else None
        self.layers = nn.ModuleList(RecallLayer(setup, cfg) for _ in range(setup.layers))
        self.norm = nn.LayerNorm(setup.dim)
        self.head = nn.Linear(setup.dim, setup.vocab)
        self.rope = Rope3D(setup.head_dim, setup.rows, setup.cols)

    def embed(self, symbols: torch.Tensor, cues: torch.Tensor, lags: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, frames * tokens, dim)``, frame-major, from ``symbols (B, frames, tokens)``,
        ``cues (B, frames)`` and ``lags (B, frames)`` (read with ``address="time"`` only)."""
        frame = self.cues(cues)
        if self.lags is not None:
            frame = frame + self.lags(lags)
        return (self.symbols(symbols) + frame[:, :, None]).flatten(1, 2)

    def forward(self, symbols: torch.Tensor, cues: torch.Tensor, lags: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, frames, tokens, vocab)`` of whole streams, block-causal over chunks (``parallel``)."""
        x = self.embed(symbols, cues, lags)
        for layer in self.layers:
            q, k, v = layer.qkv_of(x)
            y = layer.memory.parallel(q, k, v, x, self.setup.chunk_frames, rope=self.rope)
            x = x + layer.out(y.flatten(2))
        return self.head(self.norm(x)).unflatten(1, symbols.shape[1:3])

    @torch.no_grad()
    def stream(self, symbols: torch.Tensor, cues: torch.Tensor, lags: torch.Tensor, measure_before: int):
        """Logits of streams committed chunk by chunk (as generation runs), and the bytes the memories hold when
        the chunk holding frame ``measure_before`` starts, per stream: ``(logits, state bytes, global-state bytes)``."""
        F, T = self.setup.chunk_frames, self.setup.frame_tokens
        B, frames = symbols.shape[:2]
        dtype = self.symbols.weight.dtype
        states = [layer.memory.init_state(B, device=symbols.device, dtype=dtype) for layer in self.layers]
        logits, measured = [], (0, 0)
        for c0 in range(0, frames, F):
            if c0 <= measure_before < c0 + F:
                measured = (sum(s.nbytes for s in states) // B,
                            sum(t.nbytes for s in states for n, t in s.tensors.items() if n.startswith("global."))
                            // B)
            x = self.embed(symbols[:, c0: c0 + F], cues[:, c0: c0 + F], lags[:, c0: c0 + F])
            for i, layer in enumerate(self.layers):
                q, k, v = layer.qkv_of(x)
                y, states[i] = layer.memory.commit(states[i], q, k, v, x, rope=self.rope)
                x = x + layer.out(y.flatten(2))
            logits.append(self.head(self.norm(x)).unflatten(1, (-1, T)))
        return torch.cat(logits, dim=1), measured[0], measured[1]


def recall_of(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The share of queried places whose symbol is the arg-max of the logits."""
    mask = targets != IGNORE
    return float((logits.argmax(-1)[mask] == targets[mask]).float().mean())


__all__ = ["RecallSetup", "RecallSetting", "RecallBatch", "RecallNet", "RecallStreams", "make_streams",
           "stream_layout", "training_lag", "reach", "recall_of", "block_count", "VARIANTS", "IGNORE", "ADDRESSES"]
