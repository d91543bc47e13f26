"""Hybrid memory (VideoSSM): sink + window attention plus a compressed global state of evicted tokens.

Per head, a state ``M`` (head_dim x head_dim) absorbs every frame evicted from
the window through a recurrent update (the gated delta rule, or an SSD scan),
driven by gates computed from the token's block input when it entered the
window. A chunk reads it as ``silu(W_g x) * RMSNorm(l2norm(q) M)`` and adds
that to the local attention output, weighted per head by the position-aware
router ``gamma = sigmoid(w * log((t + 1) / T) + b)`` with ``t`` the frames
streamed so far and ``T`` the horizon (``(t + 1) / T`` clamped to 1).

Places. With ``global_position`` ("learned" by default, or "rope") each write's key is rotated by phases of its
place in the frame (the token's, or the block's for "block_mean"), and so is each reading query by the phases of
its own place: the state is then addressed by what and where, and a revisited place reads back what was written
there (keys that only say *what* can hold one summary per thing, not per place). Keys and queries reach the global
state without the stream's RoPE (in "absolute" mode with ``rope=`` evicted keys are rotated back, and reads use
the queries before RoPE), so a lookup does not depend on when the place was seen.

Times. With ``global_time`` ("rope" or "learned") each write's key is also rotated by its frame's stream index
times per-channel frequencies, and each reading query by its own frame's: the read of a key written ``L`` frames
before the query depends on ``L`` alone (as RoPE makes attention relative), so a query can ask for what was at its
place ``L`` frames ago, and two scenes shown at the same places write different keys instead of the later one
overwriting the earlier. The angles add to the place code's.

Time scales are counted in frames. An evicted frame is written as ``W`` items
(``evict_aggregate``: its mean, ``W = 1``; one mean per spatial block; or every
token, ``W = frame_tokens``), and every gate (log-decay, write strength, step)
is a per-frame quantity that the frame's ``W`` writes share, each using
``gate / W``. A frame's writes then decay the state by the same factor at any
resolution, and the heads' initial half-lives span ``halflife_frames``.

``W_g`` starts at zero, so a fresh hybrid memory equals ``sink_window``:
retrofitting it changes nothing until it is trained.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from memkit.errors import ConfigError
from memkit.ops import backends
from memkit.ops.rope import Rope3D, rotate
from memkit.state import state_dtype

from .local import LocalMemory


def l2norm(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + eps)


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class HybridMemory(LocalMemory):
    """Subclasses define ``gate_names``, ``_token_gates`` and ``_scan`` (the global state update), and
    ``scan_kernels``: the accelerated backends their scan can use."""

    state_fields = ("sink_frames", "window_frames", "rope_mode", "evict_aggregate")
    # (global_position shapes a state too; it enters the fingerprint where it takes effect, see _fingerprint_extra)
    scan_kernels: tuple[str, ...] = ()
    # Parameters of the read path (the rest write the global state: gates and decays).
    read_parameters: tuple[str, ...] = ("out_gate", "norm_weight", "router_w", "router_b")
    #: The gates that set how strongly a write lands (not how fast the state decays): with
    #: ``write_strength="token"`` each write keeps its token's value instead of a share of its frame's.
    strength_gates: tuple[str, ...] = ()

    def __init__(self, cfg, **dims):
        super().__init__(cfg, **dims)
        if cfg.scan_backend not in ("auto", "torch", *self.scan_kernels):
            choices = ", ".join(("auto", "torch", *self.scan_kernels))
            raise ConfigError(f"{self.kind}: scan_backend {cfg.scan_backend!r} cannot run its scan; choose {choices}")
        self.sink_frames, self.window_frames = cfg.sink_frames, cfg.window_frames
        H, D = self.num_heads, self.head_dim
        self.out_gate = nn.Linear(self.dim, H * D, bias=False)
        nn.init.zeros_(self.out_gate.weight)  # zero global read-out: equals sink_window at init
        self.norm_weight = nn.Parameter(torch.ones(D))
        self.router_w = nn.Parameter(torch.ones(H))
        self.router_b = nn.Parameter(torch.zeros(H))
        if self.spatial:
            block_grid(self.frame_shape, cfg.blocks, self.kind)  # a grid too fine for the frame fails here
        self._constants: dict = {}
        if self.addressed:
            if D % 2:
                raise ConfigError(f"{self.kind}: global_position={cfg.global_position!r} rotates channel pairs and "
                                  f"needs an even head_dim, got {D} (global_position='none' writes keys without "
                                  f"place codes)")
            phases = self._initial_phases()
            if cfg.global_position == "learned":
                self.global_phase = nn.Parameter(phases)
            else:  # fixed: a function of the config, rebuilt with the memory
                self.register_buffer("global_phase", phases, persistent=False)
        if self.timed:
            if D % 2:
                raise ConfigError(f"{self.kind}: global_time={cfg.global_time!r} rotates channel pairs and needs an "
                                  f"even head_dim, got {D}")
            freqs = self.initial_frequencies()
            if cfg.global_time == "learned":
                self.global_time_freq = nn.Parameter(freqs)
            else:
                self.register_buffer("global_time_freq", freqs, persistent=False)
        if cfg.write_strength == "token" and not self.strength_gates:
            raise ConfigError(f"{self.kind}: write_strength='token' needs a write strength apart from the decay; "
                              f"{self.kind}'s step ({', '.join(self.gate_names)}) sets both (use hybrid_gdn or "
                              f"hybrid_blockwise)")

    def _constant(self, name: str, make, device, dtype=None):
        """A constant of this memory (pooling weights, token indices; ``make()`` builds it on the CPU) on ``device``,
        copied there once, without waiting for the device (the host tensor stays alive in its cache)."""
        key = (name, device, dtype)
        if key not in self._constants:
            with torch.inference_mode(False):  # cached: it must be usable with autograd later
                value = make()
                move = lambda t: t.to(device=device, dtype=dtype, non_blocking=True)  # noqa: E731
                self._constants[key] = [move(t) for t in value] if isinstance(value, list) else move(value)
        return self._constants[key]

    @property
    def spatial(self) -> bool:
        """Whether writes group tokens by place (then the token grid and ``blocks`` shape the state)."""
        return self.cfg.evict_aggregate == "block_mean"

    def _fingerprint_extra(self) -> dict:
        extra = {"blocks": self.cfg.blocks, "frame_shape": list(self.frame_shape)} if self.spatial else {}
        if self.addressed:  # a state written with place codes reads back only with them, on the same grid
            extra.update(global_position=self.cfg.global_position, frame_shape=list(self.frame_shape))
        if self.timed:  # ... and one written with time codes only with them
            extra.update(global_time=self.cfg.global_time)
        return extra

    @classmethod
    def time_code(cls, config: dict) -> str:
        from .config import LEGACY

        return config.get("global_time", LEGACY["global_time"])

    # -- times: what the global state's keys say about when ------------------------------------
    @property
    def timed(self) -> bool:
        """Whether the global state's keys carry the stream index of their frame (``global_time``)."""
        return self.cfg.global_time != "none"

    def initial_frequencies(self) -> torch.Tensor:
        """``(heads, head_dim // 2)`` angular frequencies (radians per frame) of the time code, log-spaced from 2
        (neighbouring frames apart) down to a period of four router horizons (lags of minutes apart), the same
        for every head at init."""
        pairs = self.head_dim // 2
        longest = 2 * math.pi / (4 * self.cfg.horizon_frames)
        freqs = torch.logspace(math.log10(2.0), math.log10(longest), pairs) if pairs > 1 else torch.tensor([2.0])
        return freqs.repeat(self.num_heads, 1)

    def _read_frames(self, t: int, frames: int, device) -> torch.Tensor | None:
        """The stream indices of a chunk's frames, for the time code of its reads (None: no time code)."""
        return torch.arange(t, t + frames, device=device) if self.timed else None

    def _stamp_evicted(self, evicted: dict[str, torch.Tensor], first: int) -> None:
        if self.timed:
            n = evicted["k"].shape[1] // self.frame_tokens
            evicted["frames"] = torch.arange(first, first + n, device=evicted["k"].device)

    # -- places: what the global state's keys say about where ------------------------------------
    @classmethod
    def has_places(cls, evict_aggregate: str) -> bool:
        return evict_aggregate in ("token", "block_mean")

    def _place_grid(self) -> tuple[int, int]:
        """The grid (rows, columns) of the places the global writes carry: the frame's tokens for "token" writes,
        the blocks for "block_mean"."""
        if self.cfg.evict_aggregate == "block_mean":
            return self.cfg.blocks, self.cfg.blocks
        return self.frame_shape

    @property
    def addressed(self) -> bool:
        """Whether the global state's keys carry their place (``global_position`` and writes that have one)."""
        return self.cfg.global_position != "none" and self.has_places(self.cfg.evict_aggregate)

    def _initial_phases(self) -> torch.Tensor:
        """``(places, heads or 1, head_dim // 2)`` rotation angles of each place: for "rope" a 3D RoPE's spatial
        angles on the place grid (the time channels stay unrotated); for "learned" uniform in ``[0, 2 pi)`` per
        head, whose codes for different places are close to orthogonal from the start."""
        rows, cols = self._place_grid()
        if self.cfg.global_position == "rope":
            if self.head_dim < 6:
                raise ConfigError(f"{self.kind}: global_position='rope' needs head_dim >= 6, got {self.head_dim}")
            return Rope3D(self.head_dim, rows, cols).angles(torch.zeros(1, dtype=torch.long)).float()[:, None]
        return torch.rand(rows * cols, self.num_heads, self.head_dim // 2) * (2 * math.pi)

    def _write_places(self) -> torch.Tensor:
        """The place of each of a frame's writes, in the order :meth:`_aggregate` makes them."""
        rows, cols = self._place_grid()
        return torch.arange(rows * cols)

    def _read_places(self) -> torch.Tensor:
        """The place of each token of a frame when it reads: its own token, or its block."""
        if self.cfg.evict_aggregate == "block_mean":
            return block_grid(self.frame_shape, self.cfg.blocks, self.kind).flatten()
        return torch.arange(self.frame_tokens)

    def _code(self, t: torch.Tensor, places: torch.Tensor | None, frames: torch.Tensor | None) -> torch.Tensor:
        """Keys or queries ``t (B, n, H, D)``, frame-major with ``n / len(frames)`` items per frame, rotated by the
        phases of their ``places`` (one per item of a frame; where writes carry places) plus their frame's stream
        index in ``frames`` times the time code's frequencies (where keys carry times); computed in the state
        dtype, returned in ``t``'s (a write's keys and values share one)."""
        sdt = state_dtype(t.dtype)
        angle = None
        if self.addressed:
            angle = self.global_phase[places].to(sdt).repeat(t.shape[1] // len(places), 1, 1)
        if self.timed:
            if frames is None:
                raise ValueError(f"{self.kind}: a time-coded global write or read needs its frames' stream indices")
            when = frames.to(sdt).repeat_interleave(t.shape[1] // len(frames))[:, None, None]
            when = when * self.global_time_freq.to(sdt)
            angle = when if angle is None else angle + when
        return t if angle is None else rotate(t, angle.cos(), angle.sin())

    def _global_strips_rope(self, rope) -> bool:
        return (self.addressed or self.timed) and rope is not None and self.cfg.rope_mode == "absolute"

    def initial_rates(self) -> torch.Tensor:
        """Per head, the initial per-frame log-retention rate ``ln 2 / half-life`` (half-lives log-spaced over
        ``halflife_frames``, fastest head first; a single head takes the longest, as a global memory)."""
        lo, hi = self.cfg.halflife_frames
        if self.num_heads == 1:
            return torch.tensor([math.log(2.0) / hi])
        return math.log(2.0) / torch.logspace(math.log10(lo), math.log10(hi), self.num_heads)

    @functools.cached_property
    def _pooling(self) -> torch.Tensor | None:
        """``(W, frame_tokens)``: how an evicted frame's tokens average into its ``W`` writes (None: every token)."""
        T = self.frame_tokens
        if self.cfg.evict_aggregate == "token":
            return None
        with torch.inference_mode(False):  # cached: it must be usable with autograd later
            if self.cfg.evict_aggregate == "frame_mean":
                return torch.full((1, T), 1.0 / T, dtype=torch.float64)
            ids = block_grid(self.frame_shape, self.cfg.blocks, self.kind).flatten()
            member = F.one_hot(ids, self.cfg.blocks**2).T.double()
            return member / member.sum(dim=1, keepdim=True)

    @property
    def _writes_per_frame(self) -> int:
        pooling = self._pooling
        return self.frame_tokens if pooling is None else pooling.shape[0]

    # -- to implement -------------------------------------------------------------
    def _scan(self, M, k, v, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fold tokens ``k, v (B, n, H, D)`` with their gates into ``M (B, H, D, D)``; return the new M."""
        raise NotImplementedError

    def _check_backends(self, device, dtype):
        super()._check_backends(device, dtype)
        if self.cfg.scan_backend not in ("auto", "torch"):
            backends.resolve(f"{self.kind} scan", self.cfg.scan_backend, self.scan_kernels, device, dtype)

    # -- pieces -------------------------------------------------------------------
    def _global_empty(self, batch, device, dtype):
        D = self.head_dim
        return {"global.M": torch.zeros(batch, self.num_heads, D, D, device=device, dtype=state_dtype(dtype))}

    def router(self, t: int) -> torch.Tensor:
        """``gamma`` per head for a chunk that starts after ``t`` streamed frames."""
        pos = math.log(min((t + 1) / self.cfg.horizon_frames, 1.0))
        return torch.sigmoid(self.router_w * pos + self.router_b)

    def _readout(self, tensors, q: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
        """The raw global read-out ``l2norm(q) M`` of tokens ``q (B, N, H, D)`` (whole frames, whose stream indices
        are ``frames``; each rotated by its place's phases where writes carry places, and by its frame's time
        code where keys carry times), in the state dtype."""
        q = self._code(q, self._read_place_ids(q.device), frames)
        return read_state(tensors["global.M"], q)

    def _read_place_ids(self, device) -> torch.Tensor | None:
        return self._constant("read_places", self._read_places, device) if self.addressed else None

    def _global_read(self, tensors, q, x, t, frames=None):
        if frames is None:
            frames = self._read_frames(t, q.shape[1] // self.frame_tokens, q.device)
        return self._global_mix(tensors, q, x, self.router(t), frames)

    def _global_mix(self, tensors, q, x, gamma, frames=None):
        r = self._readout(tensors, q, frames)
        r = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-6)
        r = r.to(q.dtype) * self.norm_weight
        gate = F.silu(rearrange(self.out_gate(x), "b n (h d) -> b n h d", h=self.num_heads))
        return (gamma[:, None] * gate * r).to(q.dtype)

    def _global_gamma(self, tensors, t):
        # Until a frame leaves the window the state is all zeros and the read adds exactly zero: skip it.
        return self.router(t) if t > self.sink_frames + self.window_frames else None

    def _shared(self, name: str) -> bool:
        """Whether gate ``name`` is a frame's, shared by its writes (else each write keeps its token's)."""
        return name not in ("k", "v") and not (self.cfg.write_strength == "token" and name in self.strength_gates)

    def _aggregate(self, evicted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Evicted tokens ``(B, frames * T, ...)`` (and ``"frames"``, their frames' stream indices, where keys carry
        times) -> the frames' writes ``(B, frames * W, ...)``, each shared gate divided by ``W`` (a frame's gate is
        shared by its writes), each key rotated by its place's phases where writes carry places and by its frame's
        time code where keys carry times."""
        pooling, W = self._pooling, self._writes_per_frame
        out = {}
        for name, e in evicted.items():
            if name == "frames":
                continue
            if pooling is not None:
                frames = e.unflatten(1, (-1, self.frame_tokens))
                weights = self._constant("pooling", lambda: pooling, e.device, e.dtype)
                e = torch.einsum("wt,bft...->bfw...", weights, frames).flatten(1, 2)
            out[name] = e / W if W > 1 and self._shared(name) else e
        places = self._constant("write_places", self._write_places, out["k"].device) if self.addressed else None
        out["k"] = self._code(out["k"], places, evicted.get("frames"))
        return out

    def _items(self, evicted: dict[str, torch.Tensor]):
        """What :meth:`_write_prepared` folds into the state for an evicted payload (this layer's parameters, such
        as its place phases, are applied here; the fold itself reads none unless ``write_uses_parameters``)."""
        return self._aggregate(evicted)

    def _write_prepared(self, M, items) -> torch.Tensor:
        return self._write_items(M, items)

    def _write(self, M, evicted: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._write_prepared(M, self._items(evicted))

    def _write_items(self, M, items: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scan the writes ``items`` (``{"k", "v", gates}``, in time order) into the state ``M``."""
        gates = {n: items[n] for n in self.gate_names}
        k = l2norm(items["k"].to(M.dtype)).to(items["k"].dtype)
        return self._scan(M, k, items["v"], gates)

    def recall(self, tensors: dict[str, torch.Tensor], evicted: dict[str, torch.Tensor]):
        """What the global state returns for each write of an evicted payload (``{"k", "v", gates}`` of whole
        frames), and the values written: ``(read, values)``, both ``(B, writes, H, D)``. Their cosine says how
        well the state still holds those frames (see :func:`memkit.memory.retention`)."""
        ev = self._aggregate(evicted)
        M = tensors["global.M"]
        return read_state(M, ev["k"]), ev["v"].to(M.dtype)

    def _global_write(self, tensors, evicted):
        tensors["global.M"] = self._write(tensors["global.M"], evicted)

    #: whether ``_scan`` reads the layer's own parameters (then the layers' writes cannot share one scan). True
    #: unless a variant says otherwise: a wrong False would scan every layer with the first layer's parameters.
    write_uses_parameters: bool = True

    @classmethod
    def _global_write_many(cls, memories, tensors, evicted):
        """The layers' writes as one scan over ``layers x batch`` streams: the gates were computed when the tokens
        entered the window, so a write needs no parameter of its layer (unless ``write_uses_parameters``)."""
        if cls.write_uses_parameters or len(memories) == 1 or cls._write is not HybridMemory._write:
            # (a variant that overrides _write, not _items / _write_prepared, is written layer by layer)
            return super()._global_write_many(memories, tensors, evicted)
        batch = tensors[0]["global.M"].shape[0]
        M = torch.cat([layer["global.M"] for layer in tensors])
        joined = _cat_items([mem._items(ev) for mem, ev in zip(memories, evicted)])
        # Clones: each state owns its tensors (safetensors refuses tensors that share storage).
        for layer, new in zip(tensors, memories[0]._write_prepared(M, joined).split(batch)):
            layer["global.M"] = new.clone()

    def _global_parallel(self, q, k, v, x, chunk_frames):
        T, S, W = self.frame_tokens, self.sink_frames, self.window_frames
        frames = q.shape[1] // T
        gates = self._token_gates(x)
        M = self._global_empty(q.shape[0], q.device, q.dtype)["global.M"]
        done = 0  # frames already folded into M, counted from the first non-sink frame
        outs = []
        for c0 in range(0, frames, chunk_frames):
            evicted = max(0, c0 - S - W)  # frames S .. S + evicted - 1 have left the window
            if evicted > done:
                sl = slice((S + done) * T, (S + evicted) * T)
                payload = {"k": k[:, sl], "v": v[:, sl], **{n: g[:, sl] for n, g in gates.items()}}
                self._stamp_evicted(payload, S + done)
                M = self._write(M, payload)
                done = evicted
            sl = slice(c0 * T, min(frames, c0 + chunk_frames) * T)
            outs.append(self._global_read({"global.M": M}, q[:, sl], x[:, sl], c0))
        return torch.cat(outs, dim=1)


def _cat_items(items: list):
    """Several layers' write items (a dict of ``(B, ...)`` tensors, or a list of them) joined along the batch."""
    if isinstance(items[0], dict):
        return {name: torch.cat([it[name] for it in items]) for name in items[0]}
    return [_cat_items([it[i] for it in items]) for i in range(len(items[0]))]


def read_state(M: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``l2norm(q) M`` for keys or queries ``q (B, N, H, D)`` and a state ``M (B, H, D, D)``, in the state dtype."""
    return torch.einsum("bnhk,bhkv->bnhv", l2norm(q.to(M.dtype)), M)


def block_grid(frame_shape: tuple[int, int], blocks: int, kind: str) -> torch.Tensor:
    """``(rows, columns)`` long: the block (in raster order over a ``blocks x blocks`` grid) of each token."""
    rows, cols = frame_shape
    if blocks > rows or blocks > cols:
        raise ConfigError(f"{kind}: blocks={blocks} needs a token grid of at least {blocks}x{blocks} per frame, "
                          f"got {rows}x{cols}")
    r = torch.arange(rows) * blocks // rows
    c = torch.arange(cols) * blocks // cols
    return r[:, None] * blocks + c[None, :]
