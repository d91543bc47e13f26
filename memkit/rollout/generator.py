"""StreamingGenerator: the chunk loop of autoregressive video diffusion on an injected model.

Per chunk: draw noise, run the few denoising passes of :class:`FlowSchedule` (each one only *reads*
the memory as it was before the chunk), then one context pass on the clean chunk that *commits* it.
A prompt switch first re-encodes what the local memory holds under the new prompt (LongLive's KV
recache) and keeps the global memory. A prefix of clean latents (an encoded image, a video to
extend) is committed before the first chunk. Everything needed to continue lives in :attr:`state`,
which saves, resumes bit-identically and forks.

The noise of a chunk is a function of the stream's seed and the chunk's first frame only
(:func:`chunk_noise_seed`), so a stream carries no generator state: a resumed stream, a fork with the
same seed and a saved video extended with the same seed all draw the same noise.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from memkit.errors import ConfigError, StateFormatError
from memkit.state import StreamState

from .sampler import commit_chunk, denoise_chunk
from .schedule import FlowSchedule, PromptSchedule

log = logging.getLogger("memkit.rollout")
_SAME = object()  # fork(): the parent's VAE


@dataclass(frozen=True)
class Chunk:
    """One generated chunk. ``latents`` ``(B, C, F, H, W)`` in the model's latent space; ``video``
    ``(B, 3, f, H', W')`` in [-1, 1] when the generator decodes, else None."""

    index: int          # chunk number among the generated ones (the prefix is not counted)
    start_frame: int    # first latent frame of the chunk in the stream (the prefix counted)
    latents: torch.Tensor
    video: torch.Tensor | None
    prompt: str         # name of the prompt that conditioned it


class StreamingGenerator:
    """Stream chunks from a model injected with ``adapters.inject``.

    handle: the adapter handle. prompts: a :class:`PromptSchedule`, or prompt embeddings (one tensor,
    a list, or a name -> tensor mapping, switched by ``switches``). schedule: the denoising steps.
    context_noise: the context pass's timestep (0..1000 scale, warped by the schedule's shift like the
    denoising steps); the clean chunk is noised to that level before it is committed. seed: the noise
    seed (a non-negative int; see :func:`chunk_noise_seed`). vae: a diffusers
    ``AutoencoderKLWan`` to decode chunks as they are made (its causal cache is carried across chunks
    and saved in the state). batch: videos generated side by side. state: a stream to continue (see
    :meth:`from_state`). model_kwargs: extra arguments for every forward of the model
    (``encoder_hidden_states_image=`` for Wan I2V, ``fps=`` for SkyReels-V2). vae_offload: keep the VAE (and its
    causal cache) where it is, e.g. on the CPU, and bring it to the model's device only to decode a chunk.
    vae_batch_frames: decode a chunk's latent frames in one decoder call (default: on CUDA; see
    :class:`~memkit.rollout.vae.StreamingVAEDecoder`). track_peak_memory: record in :attr:`peak_memory` the peak
    GPU memory of the DiT passes and of the decoding (it resets the allocator's peak counter around each part, so
    it is off by default: a caller's own peak measurement would be lost).
    """

    def __init__(self, handle, prompts, *, switches=(), schedule: FlowSchedule | None = None,
                 context_noise: float = 0.0, seed: int = 0, vae=None, batch: int = 1, progress: bool = True,
                 state: StreamState | None = None, model_kwargs: dict | None = None, vae_offload: bool = False,
                 vae_batch_frames: bool | None = None, track_peak_memory: bool = False):
        self.handle = handle
        self.prompts = prompts if isinstance(prompts, PromptSchedule) else PromptSchedule(prompts, switches)
        self.schedule = schedule or FlowSchedule()
        if not 0 <= context_noise < 1000:
            raise ConfigError(f"context_noise must lie in [0, 1000), got {context_noise}")
        self.context_noise = float(context_noise)
        self.progress = progress
        self.model_kwargs = dict(model_kwargs or {})
        param = next(handle.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ConfigError(f"seed must be an int in [0, 2**63), got {seed!r}")
        self.seed = seed
        self.decoder = None
        if vae is not None:
            from .vae import StreamingVAEDecoder

            batched = self.device.type == "cuda" if vae_batch_frames is None else bool(vae_batch_frames)
            self.decoder = StreamingVAEDecoder(vae, batch_frames=batched,
                                               offload_to=self.device if vae_offload else None)
        self.peak_memory = PeakMemory(self.device, enabled=track_peak_memory)
        if state is not None:
            handle.check_state(state)
        self._stream = handle.init_state(batch) if state is None else state
        self._chunk = 0
        self._active: tuple[int | None, torch.Tensor] | None = None  # (prompt index, embeddings) in the memory
        self._batched: dict[int, torch.Tensor] = {}

    # -- the state ---------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self._stream.layers[0].batch

    @property
    def chunks_done(self) -> int:
        return self._chunk

    @property
    def cursor(self) -> int:
        """Latent frames in the stream so far (the prefix included)."""
        return self._stream.cursor

    @property
    def memory_nbytes(self) -> int:
        """Bytes of the memories, held latents and the rest of the stream (without the decoder cache)."""
        return self._stream.nbytes

    @property
    def state(self) -> StreamState:
        """Everything to continue from here: memories, cursor, held latents, prompts, noise seed, decoder cache,
        and what the stream was made with (``state.settings``)."""
        info = {
            "chunk": self._chunk,
            "adapter": self.handle.describe(),
            "sampling": {"steps": list(self.schedule.timesteps), "shift": self.schedule.shift,
                         "context_noise": self.context_noise, "seed": self.seed},
            "prompts": {"names": list(self.prompts.names), "switches": list(self.prompts.switches)},
        }
        prompt = {f"schedule.{i}": embeds for i, embeds in enumerate(self.prompts.embeds)}
        if self._active is not None:
            prompt["embeds"] = self._active[1]
        decoder = {}
        if self.decoder is not None:
            decoder, info["decoder"] = self.decoder.state_dict()
        return self._stream.replace(prompt_cache=prompt, decoder=decoder, info=info)

    def save(self, path: str | os.PathLike) -> None:
        self.state.save(path)

    @classmethod
    def from_state(cls, handle, state: StreamState | str | os.PathLike, prompts=None, *, switches=(),
                   seed: int | None = None, vae=None, schedule: FlowSchedule | None = None,
                   context_noise: float | None = None, progress: bool = True,
                   model_kwargs: dict | None = None, vae_offload: bool = False,
                   vae_batch_frames: bool | None = None, track_peak_memory: bool = False) -> "StreamingGenerator":
        """Continue a saved stream. Without ``seed`` the noise is the stream's own (bit-identical to going on
        uninterrupted); with another seed the continuation is a fork. Without ``prompts`` the stream keeps its
        prompt schedule. The denoising schedule and context noise default to the saved stream's."""
        if not isinstance(state, StreamState):
            state = StreamState.load(state, map_location=next(handle.model.parameters()).device)
        handle.check_state(state)  # with the recorded settings: names what differs
        info = dict(state.info)
        sampling = dict(info.get("sampling", {}))
        if prompts is None:
            prompts, switches = _saved_prompts(state)
        if schedule is None and "steps" in sampling:
            schedule = FlowSchedule(tuple(sampling["steps"]), sampling["shift"])
        if context_noise is None:
            context_noise = sampling.get("context_noise", 0.0)
        if seed is None:
            if "seed" not in sampling:
                raise StateFormatError("this stream state records no noise seed; pass seed= to continue with new noise")
            seed = int(sampling["seed"])
        stream = state.replace(prompt_cache={}, decoder={}, info={})
        gen = cls(handle, prompts, switches=switches, schedule=schedule, context_noise=context_noise, seed=seed,
                  vae=vae, progress=progress, state=stream, model_kwargs=model_kwargs, vae_offload=vae_offload,
                  vae_batch_frames=vae_batch_frames, track_peak_memory=track_peak_memory)
        if gen.decoder is not None:
            if "decoder" in info:
                gen.decoder.load_state_dict(dict(state.decoder), info["decoder"])
            elif state.cursor:
                log.warning("the stream state holds no VAE decoder cache: decoding restarts at this chunk")
        gen._chunk = int(info.get("chunk", 0))
        if "embeds" in state.prompt_cache:
            # Which schedule entry it was is the caller's business; what the memory holds is this tensor.
            gen._active = (None, state.prompt_cache["embeds"])
        return gen

    def fork(self, seed: int | None = None, vae=_SAME) -> "StreamingGenerator":
        """An independent generator continuing from here (``seed=None``: this one's seed, so the same noise as
        this one would draw), decoding with this one's VAE unless given another (or None)."""
        if vae is _SAME:
            vae = None if self.decoder is None else self.decoder.vae
        # States are values (no pass writes into one), so the fork may share this one's tensors; `state` already
        # copies the one mutable part, the decoder cache.
        decoder = self.decoder
        return type(self).from_state(self.handle, self.state, self.prompts, seed=seed, vae=vae,
                                     progress=self.progress, model_kwargs=self.model_kwargs,
                                     vae_offload=decoder is not None and decoder.offload_to is not None,
                                     vae_batch_frames=None if decoder is None else decoder.batch_frames,
                                     track_peak_memory=self.peak_memory.enabled)

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, latents: torch.Tensor) -> torch.Tensor | None:
        """Commit clean latents ``(B, C, F, H, W)`` before generating: an encoded image (F=1) for image-to-video,
        or an existing video to extend. Returns their decoded frames when the generator decodes."""
        if self._chunk:
            raise ConfigError("prefill must come before the first generated chunk")
        latents = latents.to(device=self.device, dtype=self.dtype)
        prompt = self._prompt_for(0)
        stream = self.handle.prefill(self._stream, latents, prompt, timestep=0.0, **self.model_kwargs)
        video = self.decoder.decode(latents) if self.decoder is not None else None
        self._stream = stream
        return video

    @torch.no_grad()
    def stream(self, num_chunks: int) -> Iterator[Chunk]:
        """Generate ``num_chunks`` more chunks, yielding each as soon as it is made."""
        if not isinstance(num_chunks, int) or num_chunks < 0:
            raise ConfigError(f"num_chunks must be a non-negative int, got {num_chunks!r}")
        bar = tqdm(total=num_chunks, desc="generating", unit="chunk", disable=not self.progress)
        try:
            for _ in range(num_chunks):
                chunk = self._next_chunk()
                bar.set_postfix_str(f"prompt {chunk.prompt}", refresh=False)
                bar.update()
                yield chunk
        finally:
            bar.close()

    def generate(self, num_chunks: int) -> torch.Tensor:
        """All of ``num_chunks`` chunks' latents, concatenated along frames."""
        self.prompts.check_range(self._chunk + num_chunks)
        return torch.cat([c.latents for c in self.stream(num_chunks)], dim=2)

    def _next_chunk(self) -> Chunk:
        h, c, kw = self.handle, self._chunk, self.model_kwargs
        prompt = self._prompt_for(c)
        shape = (self.batch, h.dims.in_channels, h.chunk_frames, *h.latent_size)
        start = self._stream.cursor
        # A chunk happens whole or not at all: nothing below changes the generator until it has succeeded.
        rng = torch.Generator(device=self.device).manual_seed(chunk_noise_seed(self.seed, start))
        noise = lambda: self._noise(shape, rng)  # noqa: E731
        with self.peak_memory.measure("DiT"):
            x0 = denoise_chunk(h, self._stream, prompt, self.schedule, noise, dtype=self.dtype, model_kwargs=kw)
            latents = x0.to(self.dtype)
            stream = commit_chunk(h, self._stream, x0, prompt, self.schedule, noise, dtype=self.dtype,
                                  context_noise=self.context_noise, model_kwargs=kw)
        video = None
        if self.decoder is not None:
            with self.peak_memory.measure("VAE decode"):
                video = self.decoder.decode(latents)
        self._stream, self._chunk = stream, c + 1
        return Chunk(c, start, latents, video, self.prompts.names[self.prompts.index_at(c)])

    def _noise(self, shape, rng: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=rng, device=self.device, dtype=torch.float32)

    def _prompt_for(self, chunk: int) -> torch.Tensor:
        """The batched prompt of chunk ``chunk``; on a change of prompt, re-encode the held frames first."""
        index = self.prompts.index_at(chunk)
        embeds = self.prompts.embeds[index]
        if index not in self._batched:
            self._batched[index] = embeds.to(device=self.device, dtype=self.dtype).expand(self.batch, -1, -1)
        prompt = self._batched[index]
        if self._active is None:
            self._active = (index, embeds)
        elif self._active[0] != index:
            if not (self._active[1].shape == embeds.shape and torch.equal(self._active[1].to(embeds.device), embeds)):
                self._stream = self.handle.recache(self._stream, prompt, **self.model_kwargs)
            self._active = (index, embeds)
        return prompt


class PeakMemory:
    """The peak GPU memory (bytes) of named parts of a stream, each the largest over its runs; nothing on a CPU or
    when not ``enabled``. Reading and resetting the allocator's peak does not wait for the device."""

    def __init__(self, device, enabled: bool = True):
        self.device = torch.device(device)
        self.enabled = bool(enabled)
        self.peaks: dict[str, int] = {}

    @contextmanager
    def measure(self, name: str):
        if self.device.type != "cuda" or not self.enabled:
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated(self.device))

    def describe(self) -> str:
        return ", ".join(f"{name} {value / 2**30:.2f} GiB" for name, value in self.peaks.items())


def chunk_noise_seed(seed: int, start_frame: int) -> int:
    """The seed of the noise generator of the chunk that starts at stream frame ``start_frame``: ``seed`` itself
    for the first chunk of a stream, a hash of both for the others."""
    if start_frame == 0:
        return seed
    digest = hashlib.sha256(f"memkit-noise:{seed}:{start_frame}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _saved_prompts(state: StreamState) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The prompt schedule a stream was saved with, or only the prompt its memory holds (older states)."""
    cache, recorded = state.prompt_cache, dict(state.info.get("prompts", {}))
    names = recorded.get("names")
    if names and all(f"schedule.{i}" in cache for i in range(len(names))):
        return {name: cache[f"schedule.{i}"] for i, name in enumerate(names)}, list(recorded.get("switches", []))
    if "embeds" in cache:
        return {"resumed": cache["embeds"]}, []
    raise StateFormatError("this stream state holds no prompt; pass prompts=")
