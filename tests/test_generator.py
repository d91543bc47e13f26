"""StreamingGenerator: resume, forks, prompt switches, prefixes, streaming decode."""

import pytest
import torch
from backbones import inject, rel_err, tiny_model

import adapters
import memkit
from memkit.rollout import FlowSchedule, StreamingGenerator
from memkit.rollout.vae import denormalize_latents, tiny_wan_vae

PROMPTS = [torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(2)]


@pytest.fixture(scope="module")
def vae():
    return tiny_wan_vae(z_dim=4, dtype=torch.float64)


@pytest.fixture
def handle():
    model = tiny_model("wan")
    h = inject(model, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3)
    for mem in h.memories:  # a "trained" memory, so the global state takes part
        with torch.no_grad():
            mem.out_gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    yield h
    adapters.remove(model)


def gen_for(handle, seed=0, switches=(), **kw):
    prompts = PROMPTS if switches else PROMPTS[:1]
    return StreamingGenerator(handle, prompts, switches=switches, seed=seed, progress=False, **kw)


def latents_of(chunks):
    return torch.cat([c.latents for c in chunks], dim=2)


def test_flow_schedule_is_self_forcing_warped_steps():
    sigmas = FlowSchedule().sigmas
    assert sigmas == pytest.approx((1.0, 0.9375, 5 / 6, 0.625))
    assert FlowSchedule((1000, 500), shift=1.0).sigmas == (1.0, 0.5)


def test_resume_from_a_saved_state_continues_bit_identically(handle, vae, tmp_path):
    gen = gen_for(handle, switches=[3], vae=vae)
    first = list(gen.stream(2))
    gen.save(tmp_path / "s.safetensors")
    rest = list(gen.stream(3))  # crosses the prompt switch at chunk 3
    resumed = StreamingGenerator.from_state(handle, tmp_path / "s.safetensors", PROMPTS, switches=[3], vae=vae,
                                            progress=False)
    assert resumed.chunks_done == 2 and resumed.state.cursor == 6
    again = list(resumed.stream(3))
    for a, b in zip(rest, again):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.video, b.video)
        assert a.index == b.index and a.prompt == b.prompt
    assert [c.prompt for c in first + rest] == ["0", "0", "0", "1", "1"]
    # without prompts, a resumed stream keeps the one it was on
    keep = StreamingGenerator.from_state(handle, tmp_path / "s.safetensors", progress=False)
    assert torch.equal(latents_of(keep.stream(1)), rest[0].latents)


def test_a_stream_with_time_coded_block_states_resumes_bit_identically(vae, tmp_path):
    """The layout design (a state per block, per-token writes with place and time codes and their own write
    strength) through the generator: a saved stream resumes bit for bit, so the frames' stream indices that code
    the keys come back with the state."""
    model = tiny_model("wan")
    h = inject(model, "hybrid_blockwise", chunk_frames=3, sink_frames=1, window_frames=3, evict_aggregate="token",
               global_time="learned", write_strength="token", blocks=2)
    for mem in h.memories:
        with torch.no_grad():
            mem.out_gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    try:
        gen = gen_for(h, vae=vae)
        list(gen.stream(3))  # past the first eviction: the global state holds time-coded keys
        gen.save(tmp_path / "t.safetensors")
        rest = list(gen.stream(2))
        resumed = StreamingGenerator.from_state(h, tmp_path / "t.safetensors", PROMPTS[:1], vae=vae, progress=False)
        again = list(resumed.stream(2))
        for a, b in zip(rest, again, strict=True):
            assert torch.equal(a.latents, b.latents) and torch.equal(a.video, b.video)
        for mem in h.memories:  # other frequencies: the same state reads back otherwise
            with torch.no_grad():
                mem.global_time_freq.mul_(1.5)
        other = StreamingGenerator.from_state(h, tmp_path / "t.safetensors", PROMPTS[:1], vae=vae, progress=False)
        assert rel_err(latents_of(other.stream(2)), latents_of(rest)) > 1e-3
    finally:
        adapters.remove(model)


def test_forks_agree_with_the_same_seed_and_differ_with_another(handle):
    gen = gen_for(handle)
    list(gen.stream(2))
    state = gen.state
    a, b, c = (StreamingGenerator.from_state(handle, state, PROMPTS[:1], seed=s, progress=False) for s in (7, 7, 8))
    la, lb, lc = (latents_of(g.stream(2)) for g in (a, b, c))
    assert torch.equal(la, lb) and not torch.equal(la, lc)
    # forking keeps the parent going as if nothing happened
    twin = gen.fork()
    assert torch.equal(latents_of(twin.stream(2)), latents_of(gen.stream(2)))


def test_prompt_switch_changes_later_chunks_and_keeps_the_global_state(handle):
    plain = latents_of(gen_for(handle, seed=1).stream(5))
    gen = gen_for(handle, seed=1, switches=[3])
    before = latents_of(gen.stream(3))
    state = gen.state
    recached = handle.recache(state, PROMPTS[1].expand(1, -1, -1))
    after = latents_of(gen.stream(2))
    assert torch.equal(before, plain[:, :, :9])
    assert rel_err(after, plain[:, :, 9:]) > 1e-3
    for old, new in zip(state.layers, recached.layers):
        assert torch.equal(old["global.M"], new["global.M"]) and old["global.M"].abs().sum() > 0
    assert not torch.equal(state.layers[1]["win.k"], recached.layers[1]["win.k"])


def test_switch_recache_uses_the_new_prompt(handle):
    """With a full memory, the re-encoded cache must be exactly what committing the same frames under the new
    prompt gives."""
    model = handle.model
    adapters.remove(model)
    h = inject(model, "full", chunk_frames=3)
    gen = StreamingGenerator(h, PROMPTS, switches=[2], seed=0, progress=False)
    frames = latents_of(gen.stream(2))
    gen._prompt_for(2)  # the switch: recache under prompt 1
    switched = gen._stream
    fresh = h.init_state(1)
    for f0 in range(0, 6, 3):
        _, fresh = h.commit(fresh, frames[:, :, f0: f0 + 3], 0.0, PROMPTS[1])
    for a, b in zip(switched.layers, fresh.layers):
        assert all(rel_err(a[n], b[n]) < 1e-12 for n in a.tensors)
    adapters.remove(model)
    inject(model, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3)  # for the fixture's teardown


def test_prefix_changes_what_follows_and_extension_continues_a_saved_video(handle, tmp_path):
    from safetensors.torch import load_file, save_file

    original = gen_for(handle, seed=3)
    made = latents_of(original.stream(4))
    save_file({"latents": made}, tmp_path / "video.safetensors")
    next_chunk = latents_of(original.fork().stream(1))

    # extended with the same seed: the same memory and the same noise (a chunk's noise depends on the seed and its
    # first frame only), so the same next chunk; with another seed, another one
    extended = gen_for(handle, seed=3)
    extended.prefill(load_file(tmp_path / "video.safetensors")["latents"])
    for a, b in zip(extended.state.layers, original.state.layers):  # the memory is the original stream's
        assert all(torch.equal(a[n], b[n]) for n in a.tensors)
    assert torch.equal(latents_of(extended.stream(1)), next_chunk)
    other = gen_for(handle, seed=99)
    other.prefill(made)
    assert rel_err(latents_of(other.stream(1)), next_chunk) > 1e-3

    without = latents_of(gen_for(handle, seed=5).stream(1))
    image = gen_for(handle, seed=5)
    image.prefill(made[:, :, :1])  # image-to-video: one clean latent frame
    with_prefix = latents_of(image.stream(1))
    assert image.state.cursor == 4 and rel_err(with_prefix, without) > 1e-3
    with pytest.raises(memkit.errors.ConfigError, match="before the first generated chunk"):
        image.prefill(made[:, :, :1])


def test_streamed_decode_equals_decoding_the_whole_video(handle, vae):
    gen = gen_for(handle, vae=vae)
    prefix = torch.randn(1, 4, 2, 4, 6, dtype=torch.float64)
    videos = [gen.prefill(prefix)]
    chunks = list(gen.stream(3))
    videos += [c.video for c in chunks]
    latents = torch.cat([prefix, latents_of(chunks)], dim=2)
    whole = vae.decode(denormalize_latents(latents, vae.config)).sample
    streamed = torch.cat(videos, dim=2)
    assert streamed.shape == whole.shape == (1, 3, 1 + 4 * 10, 32, 48)
    assert torch.equal(streamed, whole)


CHUNK = (1, 4, 3, 4, 6)  # one chunk of the tiny backbone


def test_context_noise_commits_the_chunk_noised_by_the_warped_formula(handle):
    clean_gen, noisy_gen = gen_for(handle, seed=2), gen_for(handle, seed=2, context_noise=100.0)
    clean, noisy = next(clean_gen.stream(1)).latents, next(noisy_gen.stream(1)).latents
    assert torch.equal(clean, noisy)  # the denoising passes only read the memory before the chunk
    rng = torch.Generator().manual_seed(2)
    draws = [torch.randn(CHUNK, generator=rng, dtype=torch.float32) for _ in range(5)]
    s = 0.5 / 1.4  # shift 5 warps t = 100 (s = 0.1) to 5 * 0.1 / (1 + 4 * 0.1)
    expected = ((1.0 - s) * clean.float() + s * draws[4]).double()  # the draw after the four denoising ones
    ctx = noisy_gen.state.context
    assert torch.allclose(ctx["latents"], expected, rtol=0, atol=1e-6)
    assert torch.allclose(ctx["timestep"], torch.full((1, 3), 1000.0 * s))
    # a clean context pass commits the chunk itself at t = 0, after four draws
    assert torch.equal(clean_gen.state.context["latents"], clean)
    assert torch.equal(clean_gen.state.context["timestep"], torch.zeros(1, 3))
    # what follows reads the noised context: it is what committing those latents by hand makes
    state = handle.init_state(1)
    _, state = handle.commit(state, expected, 1000.0 * s, PROMPTS[0])
    for a, b in zip(noisy_gen.state.layers, state.layers):
        assert all(rel_err(a[n], b[n]) < 1e-6 for n in a.tensors)


def test_batch_rows_are_streams_of_their_own_noise_rows(handle, monkeypatch):
    from memkit.rollout.sampler import commit_chunk, denoise_chunk

    two = StreamingGenerator(handle, PROMPTS[:1], seed=2, batch=2, progress=False)
    draws = []
    real_noise = two._noise
    monkeypatch.setattr(two, "_noise", lambda shape, rng: draws.append(real_noise(shape, rng)) or draws[-1])
    out = latents_of(two.stream(2))
    assert out.shape == (2, 4, 6, 4, 6) and len(draws) == 8
    # the rows are different videos, not copies of one
    assert rel_err(out[0], out[1]) > 0.1 and rel_err(draws[0][0], draws[0][1]) > 0.1
    # each row is exactly the single stream made from that row of every noise draw: no row sees another
    schedule = FlowSchedule()
    for b in range(2):
        noise = iter([d[b: b + 1] for d in draws]).__next__
        state, chunks = handle.init_state(1), []
        with torch.no_grad():
            for _ in range(2):
                x0 = denoise_chunk(handle, state, PROMPTS[0], schedule, noise, dtype=torch.float64)
                state = commit_chunk(handle, state, x0, PROMPTS[0], schedule, noise, dtype=torch.float64)
                chunks.append(x0.double())
        assert rel_err(out[b: b + 1], torch.cat(chunks, dim=2)) < 1e-10


def test_resume_takes_the_context_noise_from_the_saved_state(handle, tmp_path):
    gen = gen_for(handle, seed=6, context_noise=300.0)
    list(gen.stream(1))
    gen.save(tmp_path / "s.safetensors")
    rest = list(gen.stream(2))
    resumed = StreamingGenerator.from_state(handle, tmp_path / "s.safetensors", progress=False)
    assert resumed.context_noise == 300.0 and resumed.state.settings["context_noise"] == 300.0
    again = list(resumed.stream(2))
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(rest, again))
    # another context noise: the same first chunk (it reads the saved memory), a different commit after it
    other = StreamingGenerator.from_state(handle, tmp_path / "s.safetensors", context_noise=600.0, progress=False)
    assert other.context_noise == 600.0
    changed = list(other.stream(2))
    assert torch.equal(changed[0].latents, rest[0].latents)
    assert rel_err(changed[1].latents, rest[1].latents) > 1e-3


def test_a_failed_chunk_changes_nothing_and_a_retry_makes_the_same_chunk(handle, vae):
    reference = gen_for(handle, seed=4, vae=vae)
    expected = list(reference.stream(2))
    gen = gen_for(handle, seed=4, vae=vae)
    list(gen.stream(1))
    real_decode = gen.decoder.decode

    def fail_once(latents):
        gen.decoder.decode = real_decode
        raise RuntimeError("out of memory (simulated)")

    gen.decoder.decode = fail_once
    with pytest.raises(RuntimeError, match="simulated"):
        next(gen.stream(1))
    assert gen.chunks_done == 1 and gen.state.cursor == 3 and gen.decoder.frames_in == 3
    retry = next(gen.stream(1))
    assert torch.equal(retry.latents, expected[1].latents) and torch.equal(retry.video, expected[1].video)


def test_context_noise_is_a_warped_timestep_and_fork_keeps_decoding(handle, vae):
    gen = gen_for(handle, context_noise=500.0, vae=vae)
    list(gen.stream(1))
    s = FlowSchedule().sigma(500.0)
    assert torch.allclose(gen.state.context["timestep"], torch.full((1, 3), 1000.0 * s))
    fork = gen.fork(seed=1)
    assert fork.decoder is not None and next(fork.stream(1)).video is not None
    assert gen.fork(vae=None).decoder is None


def test_model_kwargs_reach_every_pass():
    model = tiny_model("wan", image_dim=8, added_kv_proj_dim=24)
    h = inject(model, "sink_window", chunk_frames=3, sink_frames=1, window_frames=3)
    text = [torch.randn(1, 512, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    image = torch.randn(1, 4, 8, dtype=torch.float64)
    outs = []
    for im in (image, image + 1):
        gen = StreamingGenerator(h, text, switches=[2], seed=0, progress=False,
                                 model_kwargs={"encoder_hidden_states_image": im})
        outs.append(latents_of(gen.stream(3)))
    assert not torch.equal(outs[0], outs[1])
    with pytest.raises(TypeError):
        next(StreamingGenerator(h, text[:1], progress=False, model_kwargs={"nope": 1}).stream(1))


# -- self-describing streams ------------------------------------------------------------------------------------
def test_a_saved_stream_records_what_it_was_made_with(handle, tmp_path):
    gen = gen_for(handle, seed=11, switches=[3], context_noise=50.0)
    list(gen.stream(2))
    gen.save(tmp_path / "s.safetensors")
    settings = memkit.StreamState.load(tmp_path / "s.safetensors").settings
    identity = adapters.loading.backbone_identity(handle.model)
    assert settings == {
        "backbone": "wan", "backbone_class": identity["class"], "backbone_config_hash": identity["config_hash"],
        **{("memory" if k == "kind" else k): v for k, v in handle.cfg.to_dict().items()},
        "chunk_frames": 3, "latent_size": list(handle.latent_size), "steps": [1000.0, 750.0, 500.0, 250.0],
        "shift": 5.0, "context_noise": 50.0, "seed": 11, "prompts": ["0", "1"], "switches": [3], "cursor": 6,
        "chunk": 2,
    }
    assert settings["window_frames"] == 3 and settings["memory"] == "hybrid_gdn"


def test_resume_from_the_file_alone_keeps_the_prompt_schedule_across_a_later_switch(handle, tmp_path):
    whole = latents_of(gen_for(handle, seed=5, switches=[3]).stream(5))
    first = gen_for(handle, seed=5, switches=[3])
    part = latents_of(first.stream(2))
    first.save(tmp_path / "s.safetensors")
    resumed = StreamingGenerator.from_state(handle, tmp_path / "s.safetensors", progress=False)
    assert resumed.prompts.switches == [3] and resumed.seed == 5
    assert torch.equal(torch.cat([part, latents_of(resumed.stream(3))], dim=2), whole)


def test_a_fork_with_the_same_seed_continues_and_another_seed_differs(handle):
    gen = gen_for(handle, seed=8)
    list(gen.stream(2))
    same, other = gen.fork(seed=8), gen.fork(seed=9)
    ahead = latents_of(gen.stream(1))
    assert torch.equal(latents_of(same.stream(1)), ahead)
    assert rel_err(latents_of(other.stream(1)), ahead) > 1e-3


def test_load_with_expect_names_each_field_that_differs(handle, tmp_path):
    gen = gen_for(handle, seed=2)
    list(gen.stream(1))
    gen.save(tmp_path / "s.safetensors")
    path = tmp_path / "s.safetensors"
    assert memkit.StreamState.load(path, expect={"window_frames": 3, "seed": 2, "latent_size": (4, 6)}).cursor == 3
    with pytest.raises(memkit.errors.StateMismatchError) as err:
        memkit.StreamState.load(path, expect={"window_frames": 9, "memory": "full", "seed": 2})
    message = str(err.value)
    assert "window_frames: file 3, expected 9" in message and "memory: file hybrid_gdn, expected full" in message
    assert "seed" not in message
    gen.state.replace(info={}).save(tmp_path / "bare.safetensors")  # a state that records nothing
    with pytest.raises(memkit.errors.StateMismatchError, match=r"seed: file \(not recorded\), expected 2"):
        memkit.StreamState.load(tmp_path / "bare.safetensors", expect={"seed": 2})
    with pytest.raises(memkit.errors.ConfigError, match="unknown stream setting"):
        memkit.StreamState.load(path, expect={"windw_frames": 3})


def test_a_stream_from_another_memory_setup_is_refused_field_by_field(handle, tmp_path):
    gen = gen_for(handle)
    list(gen.stream(1))
    saved = gen.state
    model = handle.model
    adapters.remove(model)
    other = inject(model, "hybrid_gdn", chunk_frames=3, sink_frames=2, window_frames=3)
    try:
        with pytest.raises(memkit.errors.StateMismatchError,
                           match=r"sink_frames: state 1, adapter 2") as err:
            StreamingGenerator.from_state(other, saved, progress=False)
        assert "window_frames" not in str(err.value) and "config " not in str(err.value)
    finally:
        adapters.remove(model)
        inject(model, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3)  # for the fixture's teardown
