"""The handle's input checks: a chunk's latents, timestep and prompt, and a state's fit to the adapter, each
refused with an error naming what is wrong before anything changes."""

from __future__ import annotations

import math

import torch

from memkit.errors import AdapterError, ConfigError, DeviceError, DTypeError, ShapeError, StateMismatchError
from memkit.ops._checks import autocast_dtype, check_finite
from memkit.state import StreamState


class InputChecks:
    """Part of :class:`~adapters.handle.AdapterHandle`: what every pass checks of its inputs."""

    def _check_live(self) -> None:
        if self.removed:
            raise AdapterError("this adapter was removed from its model; inject again to use it")

    def _check_chunk(self, state, latents, timestep, encoder_hidden_states, exact: bool,
                     finite: bool = True) -> torch.Tensor:
        self.check_state(state)
        self._check_latents(latents, exact, finite)
        if latents.shape[0] != state.layers[0].batch:
            raise StateMismatchError(
                f"the state holds {state.layers[0].batch} streams but the latents have batch {latents.shape[0]}"
            )
        if latents.device != state.layers[0].device:
            raise DeviceError(f"latents are on {latents.device} but the state on {state.layers[0].device}")
        self._check_prompt(encoder_hidden_states, latents)
        return self._timestep(timestep, latents, finite)

    def check_state(self, state) -> None:
        """Raise if ``state`` cannot continue on this adapter (layers, configs, cursor)."""
        self._check_live()
        if not isinstance(state, StreamState):
            raise TypeError(f"state must be a memkit.StreamState (from init_state or commit), got "
                            f"{type(state).__name__}")
        recorded = state.info.get("adapter")
        if recorded:
            self._check_recorded(recorded)
        if len(state.layers) != len(self.memories):
            raise StateMismatchError(
                f"the state has {len(state.layers)} layers but this model has {len(self.memories)} injected blocks"
            )
        for i, (layer, mem) in enumerate(zip(state.layers, self.memories)):
            if layer.fingerprint != mem.fingerprint:
                raise StateMismatchError(
                    f"layer {i} of the state belongs to a {layer.kind} memory of config {layer.fingerprint}; "
                    f"this model's is a {mem.kind} memory of config {mem.fingerprint}"
                )
            if layer.frames != state.cursor:
                raise StateMismatchError(f"layer {i} has {layer.frames} frames but the stream cursor is {state.cursor}")

    def _check_recorded(self, recorded: dict) -> None:
        """Name each field that shapes a state and differs between a stream's record and this adapter."""
        mine, theirs = self.describe(), dict(recorded)
        mem = self.memories[0]
        fields = [("memory", "kind"), *((name, name) for name in mem.state_fields)]
        pairs = [(label, theirs.get("memory", {}).get(key), mine["memory"][key]) for label, key in fields]
        pairs += [(name, theirs.get(name), mine[name]) for name in ("chunk_frames", "latent_size")]
        if "memory" in theirs:  # a record from before place (or time) codes wrote none
            theirs_codes, mine_codes = type(mem).key_codes(theirs["memory"]), type(mem).key_codes(mine["memory"])
            pairs += [(name, theirs_codes[name], mine_codes[name]) for name in mine_codes]
        diffs = [f"{name}: state {got}, adapter {want}" for name, got, want in pairs
                 if got is not None and _listed(got) != _listed(want)]
        if diffs:
            raise StateMismatchError("this stream state was made with another memory setup: " + "; ".join(diffs))

    def _check_latents(self, latents, exact: bool, finite: bool = True) -> None:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        d = self.dims
        if latents.dim() != 5:
            raise ShapeError(f"latents must be (B, C, F, H, W), got shape {tuple(latents.shape)}")
        B, C, F, H, W = latents.shape
        if C != d.in_channels:
            raise ShapeError(f"latents have {C} channels; this {self.backbone.name} model takes {d.in_channels}")
        if (H, W) != self.latent_size:
            raise ShapeError(
                f"latents are {H}x{W} but the memories were built for {self.latent_size[0]}x{self.latent_size[1]} "
                f"latent frames (adapters.inject(..., latent_size=({H}, {W})))"
            )
        if exact and F != self.chunk_frames:
            raise ShapeError(
                f"a chunk must be chunk_frames={self.chunk_frames} latent frames, got {F} "
                f"(use prefill for a prefix of any length)"
            )
        if F < 1 or F % d.patch_size[0]:
            raise ShapeError(f"latents need a positive multiple of {d.patch_size[0]} frames, got {F}")
        param = next(self.model.parameters())
        if not latents.is_floating_point():
            raise DTypeError(f"latents must be floating point, got {latents.dtype}")
        if latents.device != param.device:
            raise DeviceError(f"latents are on {latents.device} but the model on {param.device}")
        if latents.dtype != param.dtype and autocast_dtype(latents.device.type) is None:
            raise DTypeError(f"latents are {latents.dtype} but the model is {param.dtype}")
        if self.cfg.check_finite and finite:
            check_finite(latents=latents)

    def _check_prompt(self, encoder_hidden_states, latents) -> None:
        if not isinstance(encoder_hidden_states, torch.Tensor):
            raise TypeError(f"encoder_hidden_states must be a torch.Tensor, got {type(encoder_hidden_states).__name__}")
        d = self.dims
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[2] != d.text_dim:
            raise ShapeError(
                f"encoder_hidden_states must be (B, L, {d.text_dim}), got {tuple(encoder_hidden_states.shape)}"
            )
        if encoder_hidden_states.shape[0] != latents.shape[0]:
            raise ShapeError(
                f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]}, the latents {latents.shape[0]}"
            )
        if encoder_hidden_states.device != latents.device:
            raise DeviceError(
                f"encoder_hidden_states is on {encoder_hidden_states.device}, latents on {latents.device}"
            )

    def _timestep(self, timestep, latents, finite: bool = True) -> torch.Tensor:
        """``(B,)`` for a timestep shared by the chunk's frames, ``(B, F)`` for one per frame (float32)."""
        B, F = latents.shape[0], latents.shape[2]
        if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            if not math.isfinite(timestep):
                raise ConfigError(f"timestep must be finite, got {timestep}")
            return torch.full((B,), float(timestep), device=latents.device)  # no host-to-device copy
        t = torch.as_tensor(timestep)
        on_host = t.device.type == "cpu"  # checking a host tensor costs no device sync: always do it
        t = t.to(device=latents.device, dtype=torch.float32)
        if t.dim() == 0:
            t = t.expand(B)
        elif t.shape not in ((B,), (B, F)):
            raise ShapeError(f"timestep must be a number, (B,) = ({B},) or per frame (B, F) = ({B}, {F}); "
                             f"got {tuple(t.shape)}")
        if ((self.cfg.check_finite and finite) or on_host) and not bool(torch.isfinite(t).all()):
            raise ConfigError("timestep contains NaN or Inf")
        return t


def _listed(value):
    return list(value) if isinstance(value, (tuple, list)) else value
