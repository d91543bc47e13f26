"""Streaming VAE decode equals whole-video decode bit for bit; mp4 / image files round-trip."""

import json

import pytest
import torch
from PIL import Image

from memkit.errors import ConfigError, DTypeError, MemkitError, NonFiniteError, ShapeError, StateFormatError
from memkit.rollout.vae import StreamingVAEDecoder, decoded_frames, denormalize_latents, tiny_wan_vae
from memkit.rollout.video import VideoWriter, read_image, read_video, to_uint8_frames
from memkit.state import io

DTYPES = [torch.float64, torch.float32]
CHUNKINGS = [[1, 3, 3], [3, 3, 1], [2, 5], [7], [1, 1, 1, 1, 1, 1, 1]]


@pytest.fixture(scope="module")
def vaes():
    return {dtype: tiny_wan_vae(dtype=dtype) for dtype in DTYPES}


def latents(frames=7, batch=1, size=(4, 4), dtype=torch.float64, seed=0, z_dim=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, z_dim, frames, *size, generator=gen, dtype=torch.float64).to(dtype)


def pipeline_decode(vae, latents):
    """What diffusers' WanPipeline does with its final latents (pipeline_wan.py), written out here on purpose."""
    latents = latents.to(vae.device, dtype=vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(
        latents.device, latents.dtype
    )
    with torch.no_grad():
        return vae.decode(latents / std + mean, return_dict=False)[0]


def stream(decoder, latents, chunks):
    return [decoder.decode(chunk) for chunk in latents.split(chunks, dim=2)]


# ---------------------------------------------------------------------------------------------- streaming decode


@pytest.fixture(scope="module")
def whole_decodes(vaes):
    """Per dtype: 7 latent frames and what the pipeline decodes them to in one go."""
    out = {}
    for dtype, vae in vaes.items():
        z = latents(size=(4, 6), dtype=dtype)
        out[dtype] = (z, pipeline_decode(vae, z))
    return out


@pytest.mark.parametrize("batch_frames", [True, False], ids=["batched", "frame_by_frame"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunks", CHUNKINGS, ids=str)
def test_streamed_decode_equals_whole_decode(vaes, whole_decodes, dtype, chunks, batch_frames):
    vae = vaes[dtype]
    z, whole = whole_decodes[dtype]
    assert whole.shape == (1, 3, 25, 32, 48)
    decoder = StreamingVAEDecoder(vae, batch_frames=batch_frames)
    pieces = stream(decoder, z, chunks)
    expected_counts = [decoded_frames(chunks[0])] + [4 * c for c in chunks[1:]]
    assert [p.shape[2] for p in pieces] == expected_counts
    assert all(p.dtype == dtype for p in pieces)
    if batch_frames and dtype != torch.float64:  # convolutions over more frames round differently in float32
        torch.testing.assert_close(torch.cat(pieces, dim=2), whole, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(torch.cat(pieces, dim=2), whole)
    assert decoder.frames_in == 7 and decoder.frames_out == whole.shape[2] == decoded_frames(7, vae) == 25


def test_dense_post_quant_conv_matches_to_rounding():
    # A dense 1x1x1 conv may round per position differently for different frame counts (MKL float64), so a real
    # VAE's streamed decode is equal to the whole decode only up to that rounding on some backends.
    vae = tiny_wan_vae(dtype=torch.float64)
    with torch.no_grad():
        vae.post_quant_conv.weight.copy_(torch.randn(16, 16, 1, 1, 1, generator=torch.Generator().manual_seed(0)))
    z = latents(frames=4)
    streamed = torch.cat(stream(StreamingVAEDecoder(vae), z, [1, 2, 1]), dim=2)
    torch.testing.assert_close(streamed, pipeline_decode(vae, z), rtol=0, atol=1e-10)


def test_decoded_frames():
    assert [decoded_frames(n) for n in range(4)] == [0, 1, 5, 9]
    assert decoded_frames(21, tiny_wan_vae()) == 81
    with pytest.raises(ConfigError):
        decoded_frames(-1)


def test_denormalize_is_the_pipeline_formula(vaes):
    vae = vaes[torch.float32]
    z = latents(frames=3, dtype=torch.float32, seed=3)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    recip = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.equal(denormalize_latents(z, vae.config), z / recip + mean)
    raw = StreamingVAEDecoder(vae, denormalize=False).decode(denormalize_latents(z, vae.config))
    assert torch.equal(raw, StreamingVAEDecoder(vae).decode(z))
    with torch.no_grad():
        assert torch.equal(StreamingVAEDecoder(vae, denormalize=False).decode(z), vae.decode(z).sample)


@pytest.mark.parametrize("slicing", [False, True])
def test_batch_of_two_matches_whole_decode(slicing):
    vae = tiny_wan_vae()
    if slicing:
        vae.enable_slicing()
    z = latents(frames=4, batch=2, dtype=torch.float32, seed=1)
    assert torch.equal(torch.cat(stream(StreamingVAEDecoder(vae), z, [1, 3]), dim=2), pipeline_decode(vae, z))


def test_wan22_layout_with_patches_matches_whole_decode():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=12, dim_mult=[1, 2, 2, 2], num_res_blocks=1, is_residual=True, patch_size=2,
        in_channels=12, out_channels=12, latents_mean=[0.0] * 12, latents_std=[1.0] * 12, scale_factor_spatial=16,
    ).eval()
    with torch.no_grad():  # see tiny_wan_vae: a permutation keeps the 1x1x1 conv shape-invariant
        vae.post_quant_conv.weight.copy_(torch.eye(12)[torch.randperm(12)].view(12, 12, 1, 1, 1))
    z = latents(frames=5, size=(4, 4), dtype=torch.float32, z_dim=12)
    decoder = StreamingVAEDecoder(vae, denormalize=False)
    video = torch.cat(stream(decoder, z, [2, 1, 2]), dim=2)
    with torch.no_grad():
        assert torch.equal(video, vae.decode(z).sample)
    assert video.shape == (1, 3, 17, 64, 64)


def test_reset_starts_a_new_video(vaes):
    vae = vaes[torch.float32]
    z = latents(frames=3, dtype=torch.float32)
    decoder = StreamingVAEDecoder(vae)
    first = decoder.decode(z)
    decoder.reset()
    assert decoder.frames_in == decoder.frames_out == 0
    assert torch.equal(decoder.decode(z), first)
    decoder.reset()
    assert decoder.decode(latents(frames=2, size=(4, 6), dtype=torch.float32)).shape == (1, 3, 5, 32, 48)


# ---------------------------------------------------------------------------------------------- save and restore


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_save_restore_mid_stream_continues_bit_identically(vaes, dtype, tmp_path):
    vae = vaes[dtype]
    z = latents(dtype=dtype, seed=2)
    decoder = StreamingVAEDecoder(vae)
    head = decoder.decode(z[:, :, :2])
    tensors, meta = decoder.state_dict()
    assert meta["slots"].count("tensor") == len(tensors) > 0 and "rep" not in meta["slots"]
    assert meta["frames_in"] == 2 and meta["frames_out"] == 5 and meta["latent_size"] == [4, 4]
    io.write(tmp_path / "decoder.safetensors", tensors, meta)  # meta must be JSON-able
    tensors, meta = io.read(tmp_path / "decoder.safetensors", "decoder state")

    restored = StreamingVAEDecoder(vae)
    restored.load_state_dict(tensors, meta)
    assert (restored.frames_in, restored.frames_out) == (2, 5)
    tail = torch.cat(stream(restored, z[:, :, 2:], [3, 2]), dim=2)
    assert torch.equal(tail, torch.cat(stream(decoder, z[:, :, 2:], [1, 4]), dim=2))
    assert torch.equal(torch.cat([head, tail], dim=2), pipeline_decode(vae, z))


def test_state_after_first_frame_holds_rep_slots(vaes):
    vae = vaes[torch.float32]
    z = latents(frames=3, dtype=torch.float32)
    decoder = StreamingVAEDecoder(vae)
    head = decoder.decode(z[:, :, :1])
    tensors, meta = decoder.state_dict()
    assert meta["slots"].count("rep") == 2  # one per temporal upsampler
    json.dumps(meta)
    restored = StreamingVAEDecoder(vae)
    restored.load_state_dict(tensors, meta)
    assert torch.equal(torch.cat([head, restored.decode(z[:, :, 1:])], dim=2), pipeline_decode(vae, z))


def test_fresh_state_round_trips(vaes):
    vae = vaes[torch.float32]
    tensors, meta = StreamingVAEDecoder(vae).state_dict()
    assert tensors == {} and set(meta["slots"]) == {"none"}
    decoder = StreamingVAEDecoder(vae)
    decoder.decode(latents(frames=2, dtype=torch.float32))
    decoder.load_state_dict(tensors, meta)
    assert decoder.frames_in == 0
    z = latents(frames=2, size=(2, 4), dtype=torch.float32)
    assert torch.equal(decoder.decode(z), pipeline_decode(vae, z))


# ---------------------------------------------------------------------------------------------- refusals


def assert_unchanged(decoder, before):
    tensors, meta = decoder.state_dict()
    assert meta == before[1] and tensors.keys() == before[0].keys()
    assert all(torch.equal(tensors[name], before[0][name]) for name in tensors)


def test_bad_chunks_are_refused_and_leave_the_decoder_unchanged(vaes):
    vae = vaes[torch.float32]
    z = latents(frames=4, dtype=torch.float32)
    decoder = StreamingVAEDecoder(vae)
    head = decoder.decode(z[:, :, :2])
    before = decoder.state_dict()
    bad = [
        (latents(frames=1, dtype=torch.float32, z_dim=12), ShapeError, "z_dim is 16"),
        (z[0], ShapeError, "5-D"),
        (latents(frames=1, size=(4, 6), dtype=torch.float32), ShapeError, "4x6"),
        (latents(frames=1, batch=2, dtype=torch.float32), ShapeError, "batch 2"),
        (z[:, :, :0], ShapeError, "no frames"),
        (z[:, :, 2:].long(), DTypeError, "floating"),
    ]
    for chunk, error, message in bad:
        with pytest.raises(error, match=message):
            decoder.decode(chunk)
        assert_unchanged(decoder, before)

    vae.enable_tiling()
    try:
        with pytest.raises(ConfigError, match="tiling is not supported"):
            decoder.decode(z[:, :, 2:])
        assert_unchanged(decoder, before)
        with pytest.raises(ConfigError, match="tiling"):
            StreamingVAEDecoder(vae)
    finally:
        vae.disable_tiling()
    assert torch.equal(torch.cat([head, decoder.decode(z[:, :, 2:])], dim=2), pipeline_decode(vae, z))


def test_foreign_states_are_refused_and_leave_the_decoder_unchanged(vaes):
    from diffusers import AutoencoderKLWan

    vae = vaes[torch.float32]
    other = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=2).eval()
    other_decoder = StreamingVAEDecoder(other)
    other_decoder.decode(latents(frames=2, dtype=torch.float32))
    other_state = other_decoder.state_dict()
    assert other_decoder.num_cache_slots != StreamingVAEDecoder(vae).num_cache_slots

    decoder = StreamingVAEDecoder(vae)
    decoder.decode(latents(frames=2, dtype=torch.float32))
    good_tensors, good_meta = decoder.state_dict()
    before = (good_tensors, good_meta)
    first_tensor = next(iter(good_tensors))
    wider = dict(good_tensors, **{first_tensor: good_tensors[first_tensor].repeat(1, 2, 1, 1, 1)})
    refusals = [
        (other_state, StateFormatError, rf"{other_decoder.num_cache_slots} cache slots .* has "
                                        rf"{decoder.num_cache_slots}"),
        ((good_tensors, dict(good_meta, kind="memory")), StateFormatError, "not a streaming"),
        ((good_tensors, dict(good_meta, version=99)), StateFormatError, "version"),
        ((good_tensors, dict(good_meta, frames_in=-1)), StateFormatError, "frame counts"),
        ((good_tensors, dict(good_meta, frames_out=999)), StateFormatError, "made 999"),
        ((good_tensors, dict(good_meta, latent_size=[8])), StateFormatError, "latent_size"),
        ((dict(list(good_tensors.items())[1:]), good_meta), StateFormatError, "missing"),
        ((wider, good_meta), StateFormatError, "channels"),
        (({n: t.double() for n, t in good_tensors.items()}, good_meta), DTypeError, "float64"),
    ]
    for (tensors, meta), error, message in refusals:
        with pytest.raises(error, match=message):
            decoder.load_state_dict(tensors, meta)
        assert_unchanged(decoder, before)


def test_not_a_wan_vae_is_refused():
    with pytest.raises(ConfigError, match="AutoencoderKLWan"):
        StreamingVAEDecoder(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------- video files


def smooth_video(frames=9, height=32, width=48):
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack(
        [torch.stack([torch.sin(3 * x + 0.3 * t), torch.cos(2 * y - 0.2 * t), x * y]) for t in range(frames)], dim=1
    )


def test_to_uint8_frames():
    video = torch.tensor([-1.0, 0.0, 1.0, 2.0, -0.999]).view(1, 1, 1, 5).expand(3, 1, 1, 5)
    frames = to_uint8_frames(video)
    assert frames.shape == (1, 1, 5, 3) and frames.dtype == torch.uint8
    assert frames[0, 0, :, 0].tolist() == [0, 128, 255, 255, 0]
    assert torch.equal(to_uint8_frames(smooth_video()[None]), to_uint8_frames(smooth_video()))
    with pytest.raises(ShapeError, match="batch 2"):
        to_uint8_frames(torch.zeros(2, 3, 1, 4, 4))
    with pytest.raises(ShapeError):
        to_uint8_frames(torch.zeros(4, 1, 4, 4))
    with pytest.raises(DTypeError):
        to_uint8_frames(torch.zeros(3, 1, 4, 4, dtype=torch.int32))
    with pytest.raises(NonFiniteError):
        to_uint8_frames(torch.full((3, 1, 2, 2), float("nan")))


def test_mp4_round_trip(tmp_path):
    video = smooth_video()
    path = tmp_path / "nested" / "dir" / "out.mp4"
    with VideoWriter(path, fps=16) as writer:
        writer.write(video[:, :4][None].to(torch.bfloat16))
        writer.write(to_uint8_frames(video[:, 4:]))
        assert writer.frames_written == 9 and writer.frame_size == (32, 48)
    frames, fps = read_video(path)
    assert frames.shape == (9, 32, 48, 3) and frames.dtype == torch.uint8 and fps == 16
    error = (frames.float() - to_uint8_frames(video).float()).abs()
    assert error.mean() < 8 and error.max() < 80


def test_odd_sizes_are_padded_to_even(tmp_path):
    video = smooth_video(frames=3, height=33, width=47)
    with VideoWriter(tmp_path / "odd.mp4", fps=8.5) as writer:
        writer.write(video)
    frames, fps = read_video(tmp_path / "odd.mp4")
    assert frames.shape == (3, 34, 48, 3) and fps == pytest.approx(8.5)
    assert (frames[:, :33, :47].float() - to_uint8_frames(video).float()).abs().mean() < 8


def test_writer_refusals(tmp_path):
    with pytest.raises(ConfigError):
        VideoWriter(tmp_path / "a.mp4", fps=0)
    with pytest.raises(ConfigError):
        VideoWriter(tmp_path / "a.mp4", crf=99)
    path = tmp_path / "b.mp4"
    with VideoWriter(path) as writer:
        writer.write(smooth_video(frames=2))
        with pytest.raises(ShapeError, match="32x48"):
            writer.write(smooth_video(frames=1, height=16, width=16))
        with pytest.raises(ShapeError, match="one video at a time"):
            writer.write(smooth_video(frames=1)[None].expand(2, -1, -1, -1, -1))
        with pytest.raises(ShapeError):
            writer.write(torch.zeros(1, 32, 48, dtype=torch.uint8))
        assert writer.frames_written == 2
    with pytest.raises(MemkitError, match="closed"):
        writer.write(smooth_video(frames=1))
    assert read_video(path)[0].shape[0] == 2

    with VideoWriter(tmp_path / "never.mp4"):
        pass
    assert not (tmp_path / "never.mp4").exists()


def test_read_refusals(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(StateFormatError):
        read_video(junk)
    with pytest.raises(StateFormatError):
        read_image(junk)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_read_image(tmp_path, mode):
    array = to_uint8_frames(smooth_video(frames=1, height=10, width=14))[0]
    image = Image.fromarray(array.numpy()).convert(mode)
    image.save(tmp_path / "image.png")
    read = read_image(tmp_path / "image.png")
    assert read.shape == (1, 10, 14, 3) and read.dtype == torch.uint8
    if mode != "L":
        assert torch.equal(read[0], array)


def test_an_offloaded_decoder_brings_back_the_vae_and_its_cache(vaes, monkeypatch):
    """On a CPU the device moves are to the CPU itself; what is checked is that every chunk moves the VAE to the
    decoding device and back, and that the frames do not change (tests/gpu moves it for real)."""
    vae = vaes[torch.float64]
    z = latents(size=(4, 6), dtype=torch.float64)
    plain = torch.cat(stream(StreamingVAEDecoder(vae), z, [1, 3, 3]), dim=2)
    moves = []
    move = type(vae).to
    monkeypatch.setattr(vae, "to", lambda device: moves.append(str(device)) or move(vae, device), raising=False)
    decoder = StreamingVAEDecoder(vae, offload_to="cpu")
    assert torch.equal(torch.cat(stream(decoder, z, [1, 3, 3]), dim=2), plain)
    assert moves == ["cpu", "cpu"] * 3  # to the decoding device and back, per chunk
    assert next(vae.parameters()).device.type == "cpu"
    assert all(c.device.type == "cpu" for c in decoder._cache if isinstance(c, torch.Tensor))
