"""Bad input to adapters gets a clear memkit error naming the problem, and changes nothing."""

import pytest
import torch
from backbones import clip, inject, stream_commits, tiny_model
from safetensors.torch import load_file

import adapters
import memkit
from memkit.errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    DTypeError,
    NonFiniteError,
    ShapeError,
    StateFormatError,
    StateMismatchError,
)

T = torch.tensor([500.0, 500.0])


@pytest.fixture
def setup():
    model = tiny_model("wan")
    h = inject(model, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3)
    latents, prompt = clip(frames=9)
    with torch.no_grad():
        _, state = stream_commits(h, latents[:, :, :6], T, prompt)
    snapshot = [{n: t.clone() for n, t in layer.tensors.items()} for layer in state.layers]
    params = {k: v.clone() for k, v in model.state_dict().items()}
    yield h, state, latents[:, :, 6:9], prompt
    assert state.cursor == 6
    for layer, before in zip(state.layers, snapshot):
        assert all(torch.equal(before[n], t) for n, t in layer.tensors.items()), "a failed call changed the state"
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items()), "a failed call changed the model"


BAD_CALLS = {
    "latents not 5-D": (lambda c, p, t: (c[:, :, 0], p, t), ShapeError, r"\(B, C, F, H, W\)"),
    "wrong channel count": (lambda c, p, t: (c[:, :3], p, t), ShapeError, "3 channels; this wan model takes 4"),
    "wrong frame size": (lambda c, p, t: (c[..., :2], p, t), ShapeError, "latent_size=\\(4, 2\\)"),
    "chunk not chunk_frames long": (lambda c, p, t: (c[:, :, :2], p, t), ShapeError, "chunk_frames=3 latent frames"),
    "batch differs from the state": (lambda c, p, t: (c[:1], p[:1], t[:1]), StateMismatchError, "holds 2 streams"),
    "latents in another dtype": (lambda c, p, t: (c.float(), p, t), DTypeError, "latents are torch.float32"),
    "integer latents": (lambda c, p, t: (c.long(), p, t), DTypeError, "floating point"),
    "NaN latents": (lambda c, p, t: (c.index_fill(2, torch.tensor([1]), float("nan")), p, t), NonFiniteError,
                    "latents contains NaN"),
    "prompt width": (lambda c, p, t: (c, p[..., :8], t), ShapeError, r"\(B, L, 16\)"),
    "prompt batch": (lambda c, p, t: (c, p[:1], t), ShapeError, "encoder_hidden_states has batch 1"),
    "timestep shape": (lambda c, p, t: (c, p, torch.zeros(2, 5)), ShapeError, "per frame"),
    "timestep NaN": (lambda c, p, t: (c, p, torch.tensor([1.0, float("nan")])), ConfigError, "NaN"),
}


@pytest.mark.parametrize("method", ["read", "commit"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_chunks_are_refused(setup, case, method):
    h, state, chunk, prompt = setup
    make, error, message = BAD_CALLS[case]
    latents, p, t = make(chunk, prompt, T)
    with pytest.raises(error, match=message):
        getattr(h, method)(state, latents, t, p)


def test_state_of_another_config_is_refused(setup):
    h, state, chunk, prompt = setup
    other = tiny_model("wan", seed=1)
    h2 = inject(other, "hybrid_gdn", chunk_frames=3, sink_frames=2, window_frames=3)
    with pytest.raises(StateMismatchError, match="belongs to a hybrid_gdn memory of config"):
        h2.read(state, chunk, T, prompt)
    with pytest.raises(StateMismatchError, match="layers"):
        h.read(state.replace(layers=state.layers[:1]), chunk, T, prompt)
    with pytest.raises(StateMismatchError, match="cursor"):
        h.read(state.replace(cursor=3), chunk, T, prompt)
    with pytest.raises(TypeError, match="StreamState"):
        h.read(state.layers[0], chunk, T, prompt)


def test_memory_file_for_another_config_is_refused(setup, tmp_path):
    h, state, chunk, prompt = setup
    other = tiny_model("wan", seed=1)
    inject(other, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=5)
    memkit.save_memory(other, tmp_path / "window5.safetensors")
    adapters.remove(other)
    inject(other, "hybrid_ssd", chunk_frames=3, sink_frames=1, window_frames=3)
    memkit.save_memory(other, tmp_path / "ssd.safetensors")
    adapters.remove(other)
    wide = tiny_model("wan", seed=1, num_attention_heads=3)
    inject(wide, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3)
    memkit.save_memory(wide, tmp_path / "heads.safetensors")
    deep = tiny_model("wan", seed=1, num_layers=3)
    inject(deep, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3)
    memkit.save_memory(deep, tmp_path / "layers.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "ssd.safetensors").read_bytes()[:100])
    state.save(tmp_path / "stream.safetensors")

    model = h.model
    with pytest.raises(CheckpointError, match="window_frames: file 5, model 3"):
        memkit.load_memory(model, tmp_path / "window5.safetensors")
    with pytest.raises(CheckpointError, match="kind='hybrid_ssd' in the file, 'hybrid_gdn' in the model"):
        memkit.load_memory(model, tmp_path / "ssd.safetensors")
    with pytest.raises(CheckpointError, match="num_heads=3 in the file, 2 in the model"):
        memkit.load_memory(model, tmp_path / "heads.safetensors")
    with pytest.raises(CheckpointError, match="3 layers .* the model has 2"):
        memkit.load_memory(model, tmp_path / "layers.safetensors")
    with pytest.raises(StateFormatError, match="truncated or corrupt"):
        memkit.load_memory(model, tmp_path / "cut.safetensors")
    with pytest.raises(StateFormatError, match="not memory weights"):
        memkit.load_memory(model, tmp_path / "stream.safetensors")
    with pytest.raises(CheckpointError, match="no memkit memories"):
        memkit.load_memory(tiny_model("wan"), tmp_path / "ssd.safetensors")
    fresh = tiny_model("wan")
    inject(fresh, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3)
    memkit.load_memory(fresh, tmp_path / "window5.safetensors", strict=False)  # the weights fit: a warning only
    loaded = fresh.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in load_file(tmp_path / "window5.safetensors").items())


def test_injection_errors():
    model = tiny_model("wan")
    with pytest.raises(AdapterError, match="no memkit adapter for Linear"):
        adapters.inject(torch.nn.Linear(2, 2), memkit.MemoryConfig())
    with pytest.raises(ConfigError, match="MemoryConfig"):
        adapters.inject(model, {"kind": "full"})
    with pytest.raises(ConfigError, match="chunk_frames"):
        adapters.inject(model, memkit.MemoryConfig(), chunk_frames=0)
    with pytest.raises(ConfigError, match="not divisible by the patch size"):
        adapters.inject(model, memkit.MemoryConfig(), latent_size=(5, 6))
    with pytest.raises(memkit.errors.UnknownMemoryError, match="unknown memory"):
        adapters.inject(model, memkit.MemoryConfig(kind="nope"), latent_size=(4, 6))
    assert not any(".memory." in k for k in model.state_dict()), "a failed inject left memories behind"
    inject(model, "full")
    with pytest.raises(AdapterError, match="already has a memkit adapter"):
        inject(model, "full")


def test_switch_out_of_range_and_bad_schedules():
    from memkit.rollout import FlowSchedule, PromptSchedule

    a, b = torch.randn(4, 16), torch.randn(4, 16)
    schedule = PromptSchedule([a, b], switches=[5])
    schedule.check_range(6)
    with pytest.raises(ConfigError, match="switch at chunk 5 is out of range: the video has 5 chunks"):
        schedule.check_range(5)
    with pytest.raises(ConfigError, match="2 prompts need 1 switch"):
        PromptSchedule([a, b])
    with pytest.raises(ConfigError, match="strictly increasing"):
        PromptSchedule([a, b, a], switches=[4, 4])
    with pytest.raises(ConfigError, match="chunk index >= 1"):
        PromptSchedule([a, b], switches=[0])
    with pytest.raises(ShapeError, match=r"\(L, D\) or \(1, L, D\)"):
        PromptSchedule([torch.randn(2, 4, 16)])
    with pytest.raises(ConfigError, match="decrease"):
        FlowSchedule((500, 750))
    with pytest.raises(ConfigError, match="in \\(0, 1000\\]"):
        FlowSchedule((1500,))


@pytest.mark.parametrize("family", ["wan", "skyreels_v2"])
def test_inject_checks_the_rope_table_covers_the_latent_size(family):
    random_model = {"wan": adapters.random_wan, "skyreels_v2": adapters.random_skyreels_v2}[family]
    model = random_model("tiny", overrides={"rope_max_seq_len": 32})
    stock = {name: p.clone() for name, p in model.state_dict().items()}
    cfg = memkit.MemoryConfig(kind="hybrid_gdn", rope_mode="relative")
    with pytest.raises(ConfigError, match=r"latent_size \(60, 104\) makes a 30x52 token grid, but this \w+'s RoPE "
                                          r"table covers 32 positions per axis; pass a latent_size of at most 64x64"):
        adapters.inject(model, cfg, chunk_frames=3, latent_size=(60, 104))
    with pytest.raises(AdapterError, match="no memkit adapter"):  # nothing was injected
        adapters.remove(model)
    assert all(torch.equal(p, stock[name]) for name, p in model.state_dict().items())
    h = adapters.inject(model, cfg, chunk_frames=3, latent_size=(64, 64))  # the largest that fits
    assert h.grid == (32, 32)
    adapters.remove(model)


def save_as_before(model, path, old_path, *fields):
    """Save ``model``'s memory weights to ``path``, and to ``old_path`` as a memkit from before ``fields`` existed
    would have (its layers' configs without them); return the tensors."""
    from memkit.state import io

    memkit.save_memory(model, path)
    tensors, meta = io.read(path, "memory weights")
    for layer in meta["layers"].values():
        for field in fields:
            del layer["config"][field]
    io.write(old_path, tensors, meta)
    return tensors


def test_memory_files_differing_only_in_init_or_unused_fields_or_older_files_load_strictly(tmp_path):
    source = tiny_model("wan", seed=1)
    inject(source, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3, halflife_frames=(2.0, 50.0),
           blocks=3)  # blocks: unused by a single-state memory; half-lives: only the initial weights
    tensors = save_as_before(source, tmp_path / "m.safetensors", tmp_path / "old.safetensors", "blocks",
                             "halflife_frames")
    for name in ("m", "old"):
        target = tiny_model("wan")
        inject(target, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3)
        memkit.load_memory(target, tmp_path / f"{name}.safetensors")
        assert all(torch.equal(target.state_dict()[k], v) for k, v in tensors.items())
    # token writes saved before place codes existed were written without them: they load into "none" only
    plain = tiny_model("wan", seed=1)
    inject(plain, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3, evict_aggregate="token",
           global_position="none")
    save_as_before(plain, tmp_path / "t.safetensors", tmp_path / "t_old.safetensors", "global_position")
    target = tiny_model("wan")
    inject(target, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3, evict_aggregate="token",
           global_position="none")
    memkit.load_memory(target, tmp_path / "t_old.safetensors")
    for position in ("learned", "rope"):  # keys with other place codes mean something else: refused, strict or not
        coded = tiny_model("wan")
        inject(coded, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3, evict_aggregate="token",
               global_position=position)
        before = {k: v.clone() for k, v in coded.state_dict().items()}
        with pytest.raises(CheckpointError, match=f"place codes 'none' in the file, '{position}' in the model; build "
                                                  r"the memory with MemoryConfig\(global_position='none'\)"):
            memkit.load_memory(coded, tmp_path / "t_old.safetensors", strict=False)
        assert all(torch.equal(before[k], v) for k, v in coded.state_dict().items())
    memkit.save_memory(coded, tmp_path / "rope.safetensors")  # and the other way round
    with pytest.raises(CheckpointError, match="place codes 'rope' in the file, 'none' in the model"):
        memkit.load_memory(target, tmp_path / "rope.safetensors")
    frame_mean = tiny_model("wan")  # a frame's mean has no place: the option does not matter there
    inject(frame_mean, "hybrid_gdn", chunk_frames=3, global_position="none")
    memkit.save_memory(frame_mean, tmp_path / "fm.safetensors")
    other = tiny_model("wan")
    inject(other, "hybrid_gdn", chunk_frames=3)
    memkit.load_memory(other, tmp_path / "fm.safetensors")
    assert memkit.MemoryConfig.from_dict({"kind": "hybrid_gdn"}).global_position == "none"  # an old description
    spatial = tiny_model("wan", seed=1)
    inject(spatial, "hybrid_blockwise", chunk_frames=3, sink_frames=1, window_frames=3, blocks=1)
    memkit.save_memory(spatial, tmp_path / "b1.safetensors")
    target = tiny_model("wan")
    inject(target, "hybrid_blockwise", chunk_frames=3, sink_frames=1, window_frames=3)
    with pytest.raises(CheckpointError, match="blocks: file 1, model 2"):
        memkit.load_memory(target, tmp_path / "b1.safetensors")


def test_weights_and_streams_with_other_time_codes_are_refused_naming_them(tmp_path):
    """A global state whose keys carry their frame's time reads back only with the same time code: weights saved
    with another (or, before the field existed, none) are refused, strict or not, the model untouched; so is a
    stream recorded with another."""
    plain = tiny_model("wan", seed=1)
    made = inject(plain, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3, global_time="none")
    save_as_before(plain, tmp_path / "plain.safetensors", tmp_path / "old.safetensors", "global_time",
                   "write_strength")
    for time in ("rope", "learned"):
        timed = tiny_model("wan")
        inject(timed, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3, global_time=time)
        before = {k: v.clone() for k, v in timed.state_dict().items()}
        for path in ("plain", "old"):
            with pytest.raises(CheckpointError, match=f"time codes 'none' in the file, '{time}' in the model; build "
                                                      r"the memory with MemoryConfig\(global_time='none'\)"):
                memkit.load_memory(timed, tmp_path / f"{path}.safetensors", strict=False)
        assert all(torch.equal(before[k], v) for k, v in timed.state_dict().items())
    target = tiny_model("wan")
    inject(target, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3)
    memkit.load_memory(target, tmp_path / "old.safetensors")  # an old file: no time code, frame strengths
    strong = tiny_model("wan")
    inject(strong, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3, write_strength="token")
    with pytest.raises(CheckpointError, match="write_strength: file 'frame', model 'token'"):
        memkit.load_memory(strong, tmp_path / "old.safetensors")
    other = inject(tiny_model("wan"), "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3,
                   global_time="learned")
    check_the_record_names(made, other, "global_time")


def test_a_stream_state_from_other_place_codes_is_refused_naming_them():
    made = inject(tiny_model("wan", seed=1), "hybrid_gdn", evict_aggregate="token", global_position="none")
    other = inject(tiny_model("wan"), "hybrid_gdn", evict_aggregate="token")
    check_the_record_names(made, other, "global_position")


def check_the_record_names(made, other, field):
    """A stream of ``made`` (recorded with ``field`` "none") is refused by ``other`` (with "learned") naming the
    field, and so is a record from before the field existed (written without such codes); ``made`` takes both."""
    state = made.init_state(1)
    state = state.replace(info={"adapter": made.describe()})  # what the generator records
    with pytest.raises(StateMismatchError, match=f"{field}: state none, adapter learned"):
        other.check_state(state)
    legacy = state.replace(info={**state.info, "adapter": {**state.info["adapter"], "memory": {
        k: v for k, v in state.info["adapter"]["memory"].items() if k != field}}})
    with pytest.raises(StateMismatchError, match=f"{field}: state none, adapter learned"):
        other.check_state(legacy)
    made.check_state(legacy)
