"""``memkit generate`` end to end, on CPU."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_prompts import checkpoint as text_checkpoint  # noqa: F401  (a fixture: tiny UMT5 + tokenizer folder)
from test_wan_checkpoint import original_wan_state_dict

import adapters
from memkit.cli import main
from memkit.rollout.prompts import save_prompt_embeds
from memkit.rollout.vae import decoded_frames, tiny_wan_vae
from memkit.rollout.video import read_video

FAST = ["--quiet", "--dtype", "float32", "--device", "cpu"]


def run(capsys, *args):
    code = main([*args])
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())  # rich wraps long lines


def test_default_random_backbone_makes_an_mp4_then_resumes(tmp_path, capsys):
    out, state, lat = tmp_path / "v.mp4", tmp_path / "s.safetensors", tmp_path / "l.safetensors"
    code, text = run(capsys, "generate", "--seconds", "2", "--switch", "1", "--out", str(out), "--save-state",
                     str(state), "--save-latents", str(lat), *FAST)
    assert code == 0, text
    assert "randomly initialised" in text and "2 random prompt embedding" in text
    chunks = 3  # 2 s at 16 fps: 32 frames -> 9 latent frames -> 3 chunks of 3
    frames, fps = read_video(out)
    assert fps == 16 and frames.shape == (decoded_frames(3 * chunks), 64, 64, 3)
    assert load_file(lat)["latents"].shape == (1, 16, 9, 8, 8)

    more = tmp_path / "more.mp4"
    code, text = run(capsys, "generate", "--seconds", "1.5", "--resume", str(state), "--out", str(more), *FAST)
    assert code == 0, text
    assert "resuming after chunk 3" in text
    assert read_video(more)[0].shape[0] == 4 * 3 * 2  # 2 more chunks, each 12 frames: the decoder resumed too


def test_local_diffusers_folder_with_prompt_embeddings_and_switch(tmp_path, capsys):
    model = adapters.random_wan("tiny", seed=3)
    model.save_pretrained(tmp_path / "ckpt" / "transformer")
    tiny_wan_vae(z_dim=16).save_pretrained(tmp_path / "ckpt" / "vae")
    save_prompt_embeds(tmp_path / "p.safetensors", {"cat": torch.randn(6, 32), "dog": torch.randn(6, 32)})
    out = tmp_path / "v.mp4"
    size = ["--height", "32", "--width", "48", "--memory", "sink_window"]
    code, text = run(capsys, "generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt-embeds",
                     str(tmp_path / "p.safetensors"), "--switch", "2", "--seconds", "2", *size, "--out", str(out),
                     "--save-state", str(tmp_path / "s.safetensors"), *FAST)
    assert code == 0, text
    assert "the WanTransformer3DModel in" in text and "PromptSchedule(cat@0, dog@2)" in text
    assert read_video(out)[0].shape == (decoded_frames(9), 32, 48, 3)
    # a resumed stream keeps its prompt when none is given
    code, text = run(capsys, "generate", "--checkpoint", str(tmp_path / "ckpt"), "--resume",
                     str(tmp_path / "s.safetensors"), "--seconds", "1.5", *size, "--out", str(tmp_path / "more.mp4"),
                     *FAST)
    assert code == 0, text
    assert "prompts: as saved" in text and read_video(tmp_path / "more.mp4")[0].shape[0] == 24


def test_prompt_texts_through_the_checkpoint_text_encoder(tmp_path, capsys, text_checkpoint):  # noqa: F811
    import shutil

    from diffusers import WanTransformer3DModel

    root = tmp_path / "ckpt"
    shutil.copytree(text_checkpoint, root)
    WanTransformer3DModel(**{**adapters.WAN_CONFIGS["tiny"], "text_dim": 16}).save_pretrained(root / "transformer")
    code, text = run(capsys, "generate", "--checkpoint", str(root), "--prompt", "a cat", "--prompt", "a dog",
                     "--switch", "1", "--seconds", "1", "--no-decode", *FAST)
    assert code == 0, text
    assert "PromptSchedule(0: a cat@0, 1: a dog@1)" in text


def test_wan_format_checkpoint_file_and_latent_prefix(tmp_path, capsys):
    config = adapters.WAN_CONFIGS["tiny"]
    save_file(original_wan_state_dict(config, seed=1), tmp_path / "wan.safetensors")
    save_file({"latents": torch.randn(1, 16, 4, 8, 8)}, tmp_path / "prefix.safetensors")
    lat = tmp_path / "l.safetensors"
    code, text = run(capsys, "generate", "--checkpoint", str(tmp_path / "wan.safetensors"), "--no-decode",
                     "--prompt-embeds", str(_one_prompt(tmp_path)), "--prefix", str(tmp_path / "prefix.safetensors"),
                     "--seconds", "1", "--save-latents", str(lat), *FAST)
    assert code == 0, text
    assert "with the weights of" in text and "missing from the file (0)" in text
    assert "prefix: 4 latent frames" in text and "no VAE" in text
    assert load_file(lat)["latents"].shape[2] == 6


def test_video_prefix_is_encoded_and_extended(tmp_path, capsys):
    first = tmp_path / "first.mp4"
    assert run(capsys, "generate", "--seconds", "1", "--out", str(first), *FAST)[0] == 0
    extended = tmp_path / "extended.mp4"
    code, text = run(capsys, "generate", "--seconds", "1", "--prefix", str(first), "--out", str(extended), *FAST)
    assert code == 0, text
    n_first = read_video(first)[0].shape[0]  # 1 + 4k frames: encodes whole
    assert f"prefix: {(n_first - 1) // 4 + 1} latent frames" in text
    assert read_video(extended)[0].shape[0] == n_first + 4 * 6  # the prefix, then 2 chunks


def test_generate_errors_are_clear(tmp_path, capsys):
    code, text = run(capsys, "generate", "--seconds", "1", "--switch", "5", "--out", str(tmp_path / "v.mp4"), *FAST)
    assert code == 2 and "prompt switch at chunk 5 is out of range: the video has 2 chunks" in text
    code, text = run(capsys, "generate", "--checkpoint", str(tmp_path / "nowhere"), *FAST)
    assert code == 2 and "nowhere: no such file or folder" in text
    code, text = run(capsys, "generate", "--height", "60", *FAST)
    assert code == 2 and "multiple of 8" in text
    code, text = run(capsys, "generate", "--prompt", "a cat", *FAST)
    assert code == 2 and "needs a text encoder" in text


def _one_prompt(tmp_path):
    path = tmp_path / "one.safetensors"
    save_prompt_embeds(path, {"p": torch.randn(4, 32)})
    return path


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # out/ defaults land in the test's folder


def test_low_vram_makes_the_same_video(tmp_path, capsys):
    """--low-vram only changes where the VAE waits between chunks (the CPU) and when memory is released: the same
    stream comes out (on a CPU there is no GPU memory to report)."""
    runs = []
    for flags in ([], ["--low-vram"]):
        out, lat = tmp_path / f"v{len(runs)}.mp4", tmp_path / f"l{len(runs)}.safetensors"
        code, text = run(capsys, "generate", "--seconds", "1", "--out", str(out), "--save-latents", str(lat),
                         *flags, *FAST)
        assert code == 0, text
        assert "peak GPU memory" not in text
        runs.append((load_file(lat)["latents"], read_video(out)[0].shape))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


def test_weights_with_place_coded_token_writes_generate_and_resume_as_trained(tmp_path, capsys):
    """The weights' own memory config (granularity, place codes, window) builds the memory, on a new stream and
    on its resume; the stream records it."""
    from memkit import MemoryConfig
    from memkit.state import StreamState

    model = adapters.random_wan("tiny")
    cfg = MemoryConfig(kind="hybrid_gdn", sink_frames=1, window_frames=2, evict_aggregate="token")
    h = adapters.inject(model, cfg, chunk_frames=3, latent_size=(8, 8))
    with torch.no_grad():
        for p in h.memory_parameters():
            p.add_(0.1)
    weights = tmp_path / "w.safetensors"
    h.save_memory(weights)
    state, lat = tmp_path / "s.safetensors", tmp_path / "l.safetensors"
    code, text = run(capsys, "generate", "--seconds", "2", "--no-decode", "--memory-weights", str(weights),
                     "--save-state", str(state), "--save-latents", str(lat), *FAST)
    assert code == 0, text
    assert "memory hybrid_gdn (sink 1 + window 2 frames)" in text
    settings = StreamState.load(state).settings
    assert settings["evict_aggregate"] == "token" and settings["global_position"] == "learned"
    code, text = run(capsys, "generate", "--seconds", "1", "--no-decode", "--resume", str(state), *FAST)
    assert code == 0, text
    code, text = run(capsys, "generate", "--seconds", "1", "--no-decode", "--memory-weights", str(weights),
                     "--memory", "hybrid_ssd", *FAST)
    assert code == 2 and "--memory hybrid_ssd (the weights: hybrid_gdn)" in text
    code, text = run(capsys, "generate", "--seconds", "1", "--no-decode", "--memory-weights", str(weights),
                     "--chunk-frames", "1", *FAST)
    assert code == 0, text  # chunks of another size: the user's choice, the memory is the same


def test_weights_rebuild_the_random_backbone_they_were_trained_on(tmp_path, capsys):
    """A seeded random backbone is reproducible: its seed comes from the weights, --seed seeds the sampling."""
    from memkit import MemoryConfig
    from memkit.state import StreamState

    model = adapters.random_wan("tiny", seed=3)
    h = adapters.inject(model, MemoryConfig(kind="hybrid_gdn", sink_frames=1, window_frames=2), chunk_frames=3,
                        latent_size=(8, 8))
    spec = {"family": "wan", "checkpoint": None, "size": "tiny", "seed": 3, "overrides": {}, "dtype": "float32"}
    weights, state = tmp_path / "w.safetensors", tmp_path / "s.safetensors"
    h.save_memory(weights, backbone_spec=spec)
    code, text = run(capsys, "generate", "--seconds", "1", "--no-decode", "--memory-weights", str(weights),
                     "--seed", "5", "--save-state", str(state), *FAST)
    assert code == 0, text
    assert "size 'tiny', seed 3" in text
    settings = StreamState.load(state).settings
    assert settings["backbone_seed"] == 3 and settings["seed"] == 5
    code, text = run(capsys, "generate", "--seconds", "1", "--no-decode", "--memory-weights", str(weights),
                     "--resume", str(state), *FAST)
    assert code == 0, text  # the resumed stream rebuilds backbone seed 3 from its recipe


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_weights_of_a_memory_trained_with_its_backbone_point_to_the_run(tmp_path, capsys, trainable):
    """Such weights lack the backbone's trained tensors: generating from them alone would use an untrained
    backbone."""
    from memkit import MemoryConfig

    model = adapters.random_wan("tiny", seed=3)
    h = adapters.inject(model, MemoryConfig(kind="hybrid_gdn", sink_frames=1, window_frames=2), chunk_frames=3,
                        latent_size=(8, 8))
    spec = {"family": "wan", "checkpoint": None, "size": "tiny", "seed": 3, "overrides": {}, "dtype": "float32"}
    weights = tmp_path / "w.safetensors"
    h.save_memory(weights, backbone_spec=spec, trainable=trainable)
    code, text = run(capsys, "generate", "--seconds", "1", "--no-decode", "--memory-weights", str(weights), *FAST)
    assert code == 2 and f"(trainable: {trainable})" in text and "--from-run RUN_FOLDER" in text
