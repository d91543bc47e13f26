"""Bad input gets a clear memkit error naming the problem, and the caller's state is left as it was."""

import pytest
import torch
from helpers import make_clip, make_memory, stream
from safetensors.torch import save_file

import memkit
from memkit.errors import (
    BackendUnavailableError,
    ConfigError,
    DeviceError,
    DTypeError,
    MemkitError,
    NonFiniteError,
    ShapeError,
    StateFormatError,
    StateMismatchError,
    UnknownMemoryError,
)
from memkit.state import MemoryState


@pytest.fixture
def setup():
    mem = make_memory("hybrid_gdn", sink_frames=1, window_frames=2)
    q, k, v, x = make_clip(mem, batch=2, frames=6)
    _, state, _ = stream(mem, q, k, v, x, 2)
    T = mem.frame_tokens
    chunk = tuple(t[:, : 2 * T] for t in (q, k, v, x))
    snapshot = {n: t.clone() for n, t in state.tensors.items()}
    yield mem, state, chunk
    assert state.frames == 6
    assert all(torch.equal(snapshot[n], t) for n, t in state.tensors.items()), "a failed call changed the state"


def nan_at(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def every(fn):
    return lambda *chunk: tuple(fn(t) for t in chunk)


BAD_CHUNKS = {
    "q wrong rank": (lambda q, k, v, x: (q[0], k, v, x), ShapeError, "q must be"),
    "k wrong heads": (lambda q, k, v, x: (q, k[:, :, :1], v, x), ShapeError, "k must be"),
    "v wrong head dim": (lambda q, k, v, x: (q, k, v[..., :4], x), ShapeError, "v must be"),
    "x wrong width": (lambda q, k, v, x: (q, k, v, x[..., :3]), ShapeError, "x must be"),
    "x token count differs": (lambda q, k, v, x: (q, k, v, x[:, :-1]), ShapeError, "x must be"),
    "partial frame": (every(lambda t: t[:, :-1]), ShapeError, "whole, positive number of frames"),
    "empty chunk": (every(lambda t: t[:, :0]), ShapeError, "whole, positive number of frames"),
    "dtype mismatch": (lambda q, k, v, x: (q, k.float(), v, x), DTypeError, "k has dtype torch.float32"),
    "memory in another dtype": (every(torch.Tensor.float), DTypeError, "memory.to"),
    "integer input": (lambda q, k, v, x: (q.long(), k, v, x), DTypeError, "floating dtype"),
    "NaN in q": (lambda q, k, v, x: (nan_at(q), k, v, x), NonFiniteError, "q contains NaN"),
    "Inf in x": (lambda q, k, v, x: (q, k, v, x.index_fill(1, torch.tensor([0]), float("inf"))), NonFiniteError,
                 "x contains NaN or Inf"),
    "batch differs from state": (every(lambda t: t[:1]), StateMismatchError, "holds 2 streams"),
    "device mismatch": (lambda q, k, v, x: (q, k.to("meta"), v, x), DeviceError, "k is on meta"),
}


@pytest.mark.parametrize("case", list(BAD_CHUNKS))
@pytest.mark.parametrize("method", ["read", "commit"])
def test_bad_chunk(setup, case, method):
    mem, state, chunk = setup
    mutate, err, msg = BAD_CHUNKS[case]
    with pytest.raises(err, match=msg):
        getattr(mem, method)(state, *mutate(*chunk))


def test_state_from_another_config(setup):
    mem, state, chunk = setup
    other = make_memory("hybrid_gdn", sink_frames=2, window_frames=2)
    with pytest.raises(StateMismatchError, match="config"):
        other.commit(state, *chunk)
    with pytest.raises(StateMismatchError, match="hybrid_ssd"):
        mem.commit(make_memory("hybrid_ssd").init_state(2, dtype=torch.float64), *chunk)


def test_state_in_another_dtype_or_incomplete(setup):
    mem, state, chunk = setup
    with pytest.raises(DTypeError, match="state tensor 'sink.k' is torch.float32"):
        mem.read(state.to(torch.float32), *chunk)
    partial = MemoryState({n: t for n, t in state.tensors.items() if n != "global.M"}, 6, state.kind,
                          state.fingerprint, state.batch)
    with pytest.raises(StateMismatchError, match="do not match"):
        mem.commit(partial, *chunk)
    resized = state.replace({**state.tensors, "win.k": state["win.k"][:, :4]})
    with pytest.raises(StateMismatchError, match="'win.k' has shape"):
        mem.commit(resized, *chunk)


def test_not_a_state(setup):
    mem, state, chunk = setup
    with pytest.raises(TypeError, match="MemoryState"):
        mem.read(dict(state.tensors), *chunk)


def test_state_on_another_device(setup):
    mem, state, chunk = setup
    with pytest.raises(DeviceError, match="state is on meta"):
        mem.read(state.to("meta"), *chunk)


def test_wrong_rope(setup):
    mem, state, chunk = setup
    with pytest.raises(ShapeError, match="rope is for"):
        mem.read(state, *chunk, rope=memkit.ops.Rope3D(mem.head_dim, 3, 3))


def test_unknown_variant_and_bad_config():
    with pytest.raises(UnknownMemoryError, match="unknown memory 'mamba9'.*hybrid_gdn"):
        memkit.build_memory(memkit.MemoryConfig(kind="mamba9"), num_heads=1, head_dim=8, dim=8, frame_tokens=1)
    with pytest.raises(ConfigError, match="window_frames"):
        memkit.MemoryConfig(window_frames=0)
    with pytest.raises(ConfigError, match="rope_mode"):
        memkit.MemoryConfig(rope_mode="sideways")
    with pytest.raises(ConfigError, match="head_dim"):
        memkit.build_memory(memkit.MemoryConfig(), num_heads=1, head_dim=0, dim=8, frame_tokens=1)
    with pytest.raises(ConfigError, match="chunk_frames"):
        mem = make_memory("window")
        mem.parallel(*make_clip(mem), chunk_frames=0)


def test_missing_backend_names_the_extra():
    mem = make_memory("hybrid_gdn", sink_frames=0, window_frames=1, scan_backend="fla")
    q, k, v, x = make_clip(mem, frames=3)
    with pytest.raises(BackendUnavailableError, match="memkit\\[gpu\\]"):
        stream(mem, q, k, v, x, 1)


def test_truncated_and_foreign_files(setup, tmp_path):
    mem, state, chunk = setup
    path = tmp_path / "state.safetensors"
    state.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(StateFormatError, match="truncated or corrupt"):
        MemoryState.load(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(StateFormatError):
        MemoryState.load(tmp_path / "junk.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(StateFormatError, match="not a memkit memory state"):
        MemoryState.load(tmp_path / "foreign.safetensors")
    future = {"memkit_schema": "99", "meta": "{}"}
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "future.safetensors"), metadata=future)
    with pytest.raises(StateFormatError, match="schema version 99"):
        MemoryState.load(tmp_path / "future.safetensors")
    with pytest.raises(FileNotFoundError):
        MemoryState.load(tmp_path / "missing.safetensors")
    with pytest.raises(StateMismatchError, match="expected config"):
        MemoryState.load(path, expect_fingerprint="0" * 16)
    with pytest.raises(StateFormatError, match="not a MemoryState"):
        memkit.StreamState([state]).save(tmp_path / "stream.safetensors")
        MemoryState.load(tmp_path / "stream.safetensors")


def test_every_error_is_a_memkit_error():
    for err in (ShapeError, DTypeError, DeviceError, NonFiniteError, ConfigError, UnknownMemoryError,
                StateMismatchError, StateFormatError, BackendUnavailableError):
        assert issubclass(err, MemkitError)


def test_bad_op_inputs():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ShapeError, match="does not broadcast"):
        memkit.ops.attention(q, q, q, attn_mask=torch.ones(3, 4, dtype=torch.bool))
    rope = memkit.ops.Rope3D(8, 2, 2)
    with pytest.raises(TypeError, match="frame_offset must be an int"):
        rope(q, 1.7)
    with pytest.raises(DTypeError, match="must be integers"):
        rope(q, torch.tensor([0.5]))
    gate = torch.rand(1, 4, 2)
    with pytest.raises(DTypeError, match="A has dtype torch.int64"):
        memkit.ops.ssd_scan(q, gate, torch.tensor([-1, -2]), q, q)
    with pytest.raises(ShapeError, match="initial_state must be"):
        memkit.ops.gated_delta_rule(q, q, q, gate, gate, initial_state=torch.zeros(1, 2, 8, 4))
    with pytest.raises(ConfigError, match="mode"):
        memkit.ops.gated_delta_rule(q, q, q, gate, gate, mode="sideways")


def test_recurrent_kernel_without_backward_is_not_used_for_training():
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    gate = torch.rand(1, 4, 2)
    with pytest.raises(BackendUnavailableError, match="no backward"):
        memkit.ops.gated_delta_rule(q, q, q, -gate, gate, backend="fla", mode="recurrent")
    o, _ = memkit.ops.gated_delta_rule(q, q, q, -gate, gate, mode="recurrent")  # auto: the torch form
    o.sum().backward()
    assert q.grad is not None


def test_bad_init_state_and_backend_config():
    mem = make_memory("window")
    with pytest.raises(ConfigError, match="batch"):
        mem.init_state(True)
    with pytest.raises(DTypeError, match="floating dtype"):
        mem.init_state(1, dtype=torch.int32)
    with pytest.raises(ConfigError, match="attention_backend"):
        memkit.MemoryConfig(attention_backend="flsh")
    with pytest.raises(ConfigError, match="scan_backend"):
        memkit.MemoryConfig(scan_backend="fal")
    with pytest.raises(ConfigError, match="hybrid_gdn: scan_backend 'mamba_ssm'"):
        make_memory("hybrid_gdn", scan_backend="mamba_ssm")


def test_unavailable_kernel_fails_on_the_first_chunk_not_the_first_eviction():
    mem = make_memory("hybrid_gdn", sink_frames=3, window_frames=6, scan_backend="fla")
    q, k, v, x = make_clip(mem, frames=3)
    with pytest.raises(BackendUnavailableError):
        mem.commit(mem.init_state(2, dtype=torch.float64), q, k, v, x)
