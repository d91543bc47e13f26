"""Training data sources: procedural videos, a folder of video files, precomputed latent shards."""

import pickle
import time
import wave

import pytest
import torch
from safetensors.torch import save_file

from memkit.data.latent_shards import LatentShards
from memkit.data.procedural import ProceduralVideos
from memkit.data.sources import ClipSource
from memkit.data.video_folder import VideoFolder, resize_center_crop
from memkit.errors import ConfigError, DataError
from memkit.rollout.video import VideoWriter

# ---------------------------------------------------------------------------------------------- procedural videos


def test_procedural_is_deterministic_across_instances_windows_and_sizes():
    first, second = ProceduralVideos(count=6, frames=40, seed=3), ProceduralVideos(count=6, frames=40, seed=3)
    for index in range(6):
        whole = first.read(index, 0, 20, (32, 48))
        assert whole["video"].shape == (3, 20, 32, 48) and whole["video"].dtype == torch.float32
        assert torch.equal(whole["video"], second.read(index, 0, 20, (32, 48))["video"])
        assert torch.equal(whole["video"][:, 5:], first.read(index, 5, 15, (32, 48))["video"])
        assert torch.equal(whole["video"][:, 19], first.read(index, 19, 1, (32, 48))["video"][:, 0])
        assert whole["prompt_id"] == second.read(index, 7, 3, (8, 8))["prompt_id"] == first.family(index)
    odd = first.read(2, 0, 30, (33, 47))["video"]  # sizes that leave vectorised loops a remainder
    assert torch.equal(odd[:, 11:], first.read(2, 11, 19, (33, 47))["video"])


def test_procedural_frames_do_not_depend_on_thread_count():
    source = ProceduralVideos(count=2, frames=30, seed=1)
    threads = torch.get_num_threads()
    reference = source.read(1, 0, 30, (40, 56))["video"]
    try:
        torch.set_num_threads(1)
        assert torch.equal(source.read(1, 0, 30, (40, 56))["video"], reference)
    finally:
        torch.set_num_threads(threads)


def test_procedural_seeds_items_and_families_differ():
    a, b = ProceduralVideos(count=8, frames=10, seed=0), ProceduralVideos(count=8, frames=10, seed=1)
    clips = [a.read(i, 0, 4, (32, 32))["video"] for i in range(8)]
    assert not torch.allclose(clips[0], b.read(0, 0, 4, (32, 32))["video"], atol=0.05)
    assert all(not torch.allclose(clips[i], clips[j], atol=0.05) for i in range(8) for j in range(i))
    families = [a.read(i, 0, 1, (8, 8))["prompt_id"] for i in range(8)]
    assert all(isinstance(f, int) and 0 <= f < 4 for f in families)
    assert sorted(families) == [0, 0, 1, 1, 2, 2, 3, 3]  # consecutive items cycle through the families
    assert {ProceduralVideos(count=3, kinds=3).family(i) for i in range(3)} == {0, 1, 2}


def test_procedural_content_is_structured_moving_and_smooth():
    source = ProceduralVideos(count=4, frames=60, seed=0)
    for index in range(4):
        video = source.read(index, 0, 60, (64, 64))["video"]
        assert video.min() >= -1 and video.max() <= 1
        step = (video[:, 1:] - video[:, :-1]).abs().mean(dim=(0, 2, 3))  # per consecutive pair of frames
        far = (video[:, 30:] - video[:, :30]).abs().mean()
        assert (step > 1e-3).all(), "every frame should move"
        assert step.max() < 0.08 and step.mean() < far / 2, "motion should be smooth, not flicker"
        # Not noise: neighbouring pixels are far closer than random pairs.
        neighbours = (video[..., 1:] - video[..., :-1]).abs().mean()
        shuffled = video.flatten(2)[..., torch.randperm(64 * 64, generator=torch.Generator().manual_seed(0))]
        assert neighbours < 0.25 * (video.flatten(2) - shuffled).abs().mean()
        # Distinct colours: shapes are saturated, far from the grey line.
        saturation = video.max(dim=0).values - video.min(dim=0).values
        assert saturation.amax() > 1.0


def test_procedural_content_is_resolution_independent():
    source = ProceduralVideos(count=1, frames=5, seed=2)
    big = source.read(0, 0, 5, (96, 96))["video"]
    small = source.read(0, 0, 5, (48, 48))["video"]
    pooled = torch.nn.functional.avg_pool2d(big, 2)
    assert (pooled - small).abs().mean() < 0.05


def test_procedural_is_fast_and_picklable():
    source = ProceduralVideos(count=4, frames=240)
    threads = torch.get_num_threads()
    timings = []
    try:
        # One thread, as in a data loader worker; a busy machine also makes multi-threaded timings erratic.
        torch.set_num_threads(1)
        source.read(0, 0, 48, (64, 64))
        for index in range(4):
            started = time.perf_counter()
            source.read(index, 100, 48, (64, 64))
            timings.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    assert min(timings) < 0.1  # about 9 ms here; generous for a busy CI machine
    copy = pickle.loads(pickle.dumps(source))
    assert torch.equal(copy.read(3, 0, 2, (16, 16))["video"], source.read(3, 0, 2, (16, 16))["video"])


def test_procedural_refusals():
    source = ProceduralVideos(count=2, frames=10)
    assert isinstance(source, ClipSource) and source.modality == "video" and len(source) == 2
    assert source.num_frames(1) == 10 and "#1" in source.describe(1) and "seed 0" in source.describe(1)
    for kwargs in ({"count": 0}, {"frames": -1}, {"kinds": 0}, {"count": 2.5}, {"seed": "x"}, {"frames": True}):
        with pytest.raises(ConfigError):
            ProceduralVideos(**kwargs)
    with pytest.raises(DataError, match=r"procedural video #1 .*\[8, 12\).* 10 frames"):
        source.read(1, 8, 4, (8, 8))
    with pytest.raises(IndexError):
        source.read(2, 0, 1, (8, 8))
    with pytest.raises(ConfigError):
        source.read(0, 0, 1, (0, 8))


# ---------------------------------------------------------------------------------------------- video folders


def known_frames(count=12, height=48, width=64):
    """Frames whose brightness identifies them (10 levels apart) over a smooth gradient the codec keeps well."""
    ys = torch.linspace(0, 40, height).view(height, 1, 1)
    xs = torch.linspace(0, 40, width).view(1, width, 1)
    channel = torch.tensor([0.0, 20.0, 40.0]).view(1, 1, 3)
    return torch.stack([(30 + 12 * k + ys + xs * 0.5 + channel).clamp(0, 255) for k in range(count)]).to(torch.uint8)


def as_float(frames):
    return frames.permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, F, H, W)


@pytest.fixture
def video_dir(tmp_path):
    root = tmp_path / "clips"
    with VideoWriter(root / "b.mp4") as writer:
        writer.write(known_frames())
    with VideoWriter(root / "sub" / "a.mp4") as writer:
        writer.write(known_frames(count=5, height=32, width=32))
    (root / "notes.txt").write_text("not a video")
    (root / ".hidden.mp4").write_text("skipped")
    return root


def test_video_folder_lists_counts_and_reads_back_the_frames(video_dir):
    folder = VideoFolder(video_dir)
    assert folder.modality == "video" and len(folder) == 2
    assert [folder.describe(i) for i in range(2)] == [str(video_dir / "b.mp4"), str(video_dir / "sub" / "a.mp4")]
    assert [folder.num_frames(i) for i in range(2)] == [12, 5]
    frames = known_frames()
    item = folder.read(0, 0, 12, (48, 64))
    assert set(item) == {"video"}
    video = item["video"]
    assert video.shape == (3, 12, 48, 64) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    expected = as_float(frames)
    assert (video - expected).abs().mean() < 0.02  # H.264 at crf 18 is close, not exact
    window = folder.read(0, 4, 5, (48, 64))["video"]
    assert (window - expected[:, 4:9]).abs().mean() < 0.02
    brightness = window.mean(dim=(0, 2, 3))
    nearest = [int((as_float(frames).mean(dim=(0, 2, 3)) - b).abs().argmin()) for b in brightness]
    assert nearest == [4, 5, 6, 7, 8]


def test_video_folder_stride_and_windows(video_dir):
    folder = VideoFolder(video_dir, stride=3)
    assert [folder.num_frames(i) for i in range(2)] == [4, 2]  # frames 0 3 6 9 of 12, and 0 3 of 5
    expected = as_float(known_frames())
    video = folder.read(0, 1, 3, (48, 64))["video"]  # file frames 3, 6, 9
    assert (video - expected[:, 3:12:3]).abs().mean() < 0.02
    with pytest.raises(DataError, match=r"b\.mp4 \(every 3th frame\).*\[2, 6\).* 4 frames"):
        folder.read(0, 2, 4, (48, 64))
    with pytest.raises(DataError, match=r"a\.mp4.*\[0, 6\).* 5 frames"):
        VideoFolder(video_dir).read(1, 0, 6, (32, 32))
    with pytest.raises(ConfigError):
        VideoFolder(video_dir, stride=0)


def test_video_folder_extensions_and_resizing(video_dir):
    only_sub = VideoFolder(video_dir, extensions=["MP4"])
    assert len(only_sub) == 2
    video = VideoFolder(video_dir).read(0, 0, 2, (24, 24))["video"]
    assert video.shape == (3, 2, 24, 24)  # 48x64 scaled to 24x32, the middle 24 columns kept
    reference = torch.nn.functional.interpolate(as_float(known_frames(2)).permute(1, 0, 2, 3), size=(24, 32),
                                                mode="bilinear", antialias=True)[..., 4:28].permute(1, 0, 2, 3)
    assert (video - reference).abs().mean() < 0.02


def test_resize_center_crop_geometry():
    # A column ramp: value = 3 * column. Landscape 40x80 covers 20x20 at scale 0.5 (20x40), keeping columns 20-59.
    columns = (torch.arange(80) * 3).to(torch.uint8)
    frames = columns.view(1, 1, 80, 1).expand(2, 40, 80, 3).contiguous()
    out = resize_center_crop(frames, (20, 20))
    assert out.shape == (3, 2, 20, 20)
    # Antialiased bilinear by exactly 2 keeps a linear ramp linear: output column j samples input column 2j + 0.5.
    expected_levels = 3 * (20 + 2 * torch.arange(20) + 0.5)
    torch.testing.assert_close(out[0, 0, 10], expected_levels / 127.5 - 1, rtol=0, atol=1e-4)
    torch.testing.assert_close(out[:, :, 0], out[:, :, 19])  # all rows alike for a column ramp
    # Portrait: the middle rows are kept; the same size is returned as it is, only rescaled to [-1, 1].
    rows = (torch.arange(80) * 3).to(torch.uint8).view(1, 80, 1, 1).expand(1, 80, 40, 3).contiguous()
    out = resize_center_crop(rows, (20, 20))
    torch.testing.assert_close(out[1, 0, :, 7], 3 * (20 + 2 * torch.arange(20) + 0.5) / 127.5 - 1, rtol=0, atol=1e-4)
    same = resize_center_crop(frames, (40, 80))
    assert torch.equal(same, frames.permute(3, 0, 1, 2).float() / 127.5 - 1)
    # Upscaling a 10x10 to 30x20: scale 3, 30x30, columns 5-24 kept.
    small = torch.randint(0, 256, (1, 10, 10, 3), dtype=torch.uint8)
    up = resize_center_crop(small, (30, 20))
    reference = torch.nn.functional.interpolate(small.permute(0, 3, 1, 2).float(), size=(30, 30), mode="bilinear",
                                                antialias=True)[..., 5:25]
    torch.testing.assert_close(up, (reference / 127.5 - 1).clamp(-1, 1).permute(1, 0, 2, 3))


def test_video_folder_bad_files(tmp_path, video_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.mp4").write_text("this is not a video")
    data = (video_dir / "b.mp4").read_bytes()
    (bad / "truncated.mp4").write_bytes(data[: len(data) // 2])
    with wave.open(str(bad / "sound.mkv"), "wb") as audio:  # a WAV file by its content: no video stream
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(8000)
        audio.writeframes(b"\0\0" * 800)
    folder = VideoFolder(bad)
    assert [p.name for p in folder.files] == ["sound.mkv", "text.mp4", "truncated.mp4"]
    with pytest.raises(DataError, match=r"sound\.mkv has no video stream"):
        folder.num_frames(0)
    with pytest.raises(DataError, match=r"sound\.mkv has no video stream"):
        folder.read(0, 0, 1, (8, 8))
    for index, name in ((1, "text.mp4"), (2, "truncated.mp4")):
        with pytest.raises(DataError, match=rf"{name} is not a readable video: \S"):
            folder.num_frames(index)
        with pytest.raises(DataError, match=rf"{name} is not a readable video"):
            folder.read(index, 0, 1, (8, 8))


def test_video_folder_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VideoFolder(tmp_path / "nowhere")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=rf"{tmp_path} holds no \.mp4, \.webm, \.mov, \.avi, \.mkv files"):
        VideoFolder(tmp_path)
    with pytest.raises(ConfigError):
        VideoFolder(tmp_path / "a.txt")


# ---------------------------------------------------------------------------------------------- latent shards


def shard(path, latents, prompt=None, **extra):
    tensors = {"latents": latents, **extra}
    if prompt is not None:
        tensors["prompt_embeds"] = prompt
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def test_latent_shards_read_exactly_the_saved_slice(tmp_path):
    gen = torch.Generator().manual_seed(0)
    four = torch.randn(4, 10, 6, 8, generator=gen)
    five = torch.randn(1, 16, 3, 6, 8, generator=gen).to(torch.bfloat16)
    prompt = torch.randn(1, 7, 12, generator=gen)
    shard(tmp_path / "b.safetensors", four, prompt)
    shard(tmp_path / "a" / "z.safetensors", five, prompt[0].double())
    source = LatentShards(tmp_path)
    assert source.modality == "latents" and len(source) == 2
    assert source.describe(0) == str(tmp_path / "a" / "z.safetensors")
    assert [source.num_frames(i) for i in range(2)] == [3, 10]
    assert [source.channels(i) for i in range(2)] == [16, 4]
    item = source.read(1, 3, 4, (6, 8))
    assert torch.equal(item["latents"], four[:, 3:7]) and item["latents"].dtype == torch.float32
    assert torch.equal(item["prompt_embeds"], prompt[0]) and item["prompt_embeds"].dtype == torch.float32
    item = source.read(0, 1, 2, (6, 8))
    assert torch.equal(item["latents"], five[0, :, 1:3].float())
    assert torch.equal(item["prompt_embeds"], prompt[0].double().float())
    shard(tmp_path / "b.safetensors", four)  # no prompt
    assert set(LatentShards(tmp_path).read(1, 0, 10, (6, 8))) == {"latents"}


def test_latent_shards_bad_files(tmp_path):
    good = tmp_path / "good" / "good.safetensors"
    shard(good, torch.zeros(4, 5, 6, 8))
    data = good.read_bytes()
    cases = {
        "truncated": (data[:-7], r"truncated\.safetensors is not a readable safetensors file"),
        "header": (data[:20], r"header\.safetensors is not a readable safetensors file"),
        "pickle": (None, r"pickle\.safetensors is not a readable safetensors file"),
    }
    for name, (content, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        path = folder / f"{name}.safetensors"
        if content is None:
            torch.save({"latents": torch.zeros(4, 5, 6, 8)}, path)
        else:
            path.write_bytes(content)
        source = LatentShards(folder)
        with pytest.raises(DataError, match=message):
            source.num_frames(0)
        with pytest.raises(DataError, match=message):
            source.read(0, 0, 1, (6, 8))

    def refused(latents, message, name="x", **extra):
        folder = tmp_path / f"case_{name}"
        shard(folder / f"{name}.safetensors", latents, **extra)
        with pytest.raises(DataError, match=message):
            LatentShards(folder).read(0, 0, 1, (6, 8))

    folder = tmp_path / "case_no_latents"
    folder.mkdir()
    save_file({"z": torch.zeros(4, 5, 6, 8)}, str(folder / "no_latents.safetensors"))
    with pytest.raises(DataError, match=r"no_latents\.safetensors holds no 'latents' tensor \(it has \['z'\]\)"):
        LatentShards(folder).num_frames(0)
    refused(torch.zeros(4, 5, 6), r"rank\.safetensors: latents have shape \(4, 5, 6\)", name="rank")
    refused(torch.zeros(2, 4, 5, 6, 8), r"batch\.safetensors: latents have shape \(2, 4, 5, 6, 8\)", name="batch")
    refused(torch.zeros(4, 5, 6, 10), r"size\.safetensors: latents are 6x10 but 6x8 latents are needed", name="size")
    refused(torch.zeros(4, 5, 6, 8, dtype=torch.int32), r"int\.safetensors: latents are I32", name="int")
    refused(torch.zeros(4, 0, 6, 8), r"empty\.safetensors: latents are empty", name="empty")
    refused(torch.zeros(4, 5, 6, 8), r"prompt\.safetensors: prompt_embeds are .*\(2, 3, 4\)", name="prompt",
            prompt=torch.zeros(2, 3, 4))
    with pytest.raises(DataError, match=r"good\.safetensors: frames \[3, 7\).* 5 frames"):
        LatentShards(good.parent).read(0, 3, 4, (6, 8))


def test_latent_shards_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="shards"):
        LatentShards(tmp_path / "shards")
    (tmp_path / "latents.pt").write_bytes(b"")
    with pytest.raises(DataError, match=rf"{tmp_path} holds no \.safetensors files"):
        LatentShards(tmp_path)
