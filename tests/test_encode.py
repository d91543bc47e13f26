"""``memkit encode``: videos to latent shards with a (tiny, random) Wan VAE, read back with LatentShards."""

import io

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from memkit.cli_args import ArgumentParser
from memkit.data.encode import add_encode_parser, encode_folder, run_encode, shard_name
from memkit.data.latent_shards import LatentShards
from memkit.errors import ConfigError, DataError
from memkit.rollout.prompts import encode_prompts
from memkit.rollout.vae import encode_video, tiny_wan_vae
from memkit.rollout.video import VideoWriter, read_video


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    tiny_wan_vae(z_dim=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae(vae_dir):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(str(vae_dir), local_files_only=True).eval()


def moving_frames(count, height, width, seed):
    """A bright square gliding over a gradient: smooth, so H.264 keeps it close."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(3, generator=gen) * 120
    ys, xs = torch.arange(height).view(-1, 1), torch.arange(width).view(1, -1)
    frames = []
    for t in range(count):
        frame = (base.view(1, 1, 3) + ys[..., None] + xs[..., None]).clamp(0, 255)
        inside = ((ys - 4 - t).abs() < 5) & ((xs - 6 - 2 * t).abs() < 5)
        frames.append(torch.where(inside[..., None], torch.tensor([250.0, 40, 90]), frame))
    return torch.stack(frames).to(torch.uint8)


@pytest.fixture
def videos(tmp_path):
    root = tmp_path / "videos"
    with VideoWriter(root / "a.mp4") as writer:
        writer.write(moving_frames(9, 32, 48, seed=0))
    with VideoWriter(root / "sub" / "b.mp4") as writer:
        writer.write(moving_frames(5, 40, 40, seed=1))
    (root / "broken.mp4").write_text("not a video at all")
    return root


def command(*argv):
    parser = ArgumentParser(prog="memkit")
    add_encode_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["encode", *map(str, argv)])


def run(*argv):
    buffer = io.StringIO()
    code = run_encode(command(*argv, "--quiet", "--device", "cpu"), Console(file=buffer, width=400))
    return code, buffer.getvalue()


def reference(vae, path, size, max_frames=None):
    frames = read_video(path)[0]
    return encode_video(vae, frames[:max_frames], size)[0]


def test_encode_writes_the_vae_latents_and_reports_the_bad_video(videos, vae_dir, vae, tmp_path):
    out = tmp_path / "shards"
    code, printed = run(videos, "--vae", vae_dir, "--out", out, "--height", 32, "--width", 32)
    assert code == 1
    assert "broken.mp4 is not a readable video" in printed
    assert "2 shards written" in printed and "1 failed" in printed
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors", "sub__b.safetensors"]  # no temp files left
    for name, video in (("a", "a.mp4"), ("sub__b", "sub/b.mp4")):
        saved = load_file(out / f"{name}.safetensors")
        assert set(saved) == {"latents"} and saved["latents"].dtype == torch.float32
        assert saved["latents"].shape[:2] == (4, 3 if name == "a" else 2) and saved["latents"].std() > 0.1
        assert torch.equal(saved["latents"], reference(vae, videos / video, (32, 32)))
        with safe_open(str(out / f"{name}.safetensors"), framework="pt") as f:
            assert f.metadata() == {"source": str(videos / video), "memkit": "latent shard"}
    shards = LatentShards(out)
    assert len(shards) == 2
    assert [shards.num_frames(i) for i in range(2)] == [3, 2]  # 9 frames -> 1 + 2 latent frames; 5 -> 1 + 1
    assert [shards.channels(i) for i in range(2)] == [4, 4]
    item = shards.read(0, 1, 2, (4, 4))
    assert torch.equal(item["latents"], load_file(out / "a.safetensors")["latents"][:, 1:3])


def test_existing_shards_are_kept_unless_overwrite(videos, vae_dir, vae, tmp_path):
    out = tmp_path / "shards"
    assert run(videos, "--vae", vae_dir, "--out", out, "--height", 32, "--width", 32)[0] == 1
    save_file({"latents": torch.zeros(4, 1, 4, 4)}, str(out / "a.safetensors"))
    before = (out / "a.safetensors").read_bytes()
    code, printed = run(videos, "--vae", vae_dir, "--out", out, "--height", 32, "--width", 32)
    assert code == 1 and (out / "a.safetensors").read_bytes() == before
    assert "0 shards written" in printed and "2 already there" in printed
    code, printed = run(videos, "--vae", vae_dir, "--out", out, "--height", 32, "--width", 32, "--overwrite")
    assert code == 1 and "2 shards written" in printed
    assert torch.equal(load_file(out / "a.safetensors")["latents"], reference(vae, videos / "a.mp4", (32, 32)))


def test_encode_folder_native_size_and_max_frames(videos, vae, tmp_path):
    (videos / "broken.mp4").unlink()
    with VideoWriter(videos / "odd.mp4") as writer:
        writer.write(moving_frames(5, 36, 36, seed=2))
    report = encode_folder(videos, tmp_path / "out", vae, size=None, max_frames=6, progress=False)
    assert report.written == 2 and report.skipped_existing == 0
    assert [(path, message) for path, message in report.failed] == [
        (str(videos / "odd.mp4"), f"{videos / 'odd.mp4'} is 36x36, not a multiple of the VAE's 8; pass --height and "
                                  f"--width")]
    latents = load_file(tmp_path / "out" / "a.safetensors")["latents"]
    assert latents.shape == (4, 2, 4, 6)  # 6 frames kept as 1 + 4, at 32x48 / 8
    assert torch.equal(latents, reference(vae, videos / "a.mp4", None, max_frames=6))
    again = encode_folder(videos, tmp_path / "out", vae, progress=False, size=(16, 16))
    assert again.written == 1 and again.skipped_existing == 2 and len(again.failed) == 0
    with pytest.raises(ConfigError):
        encode_folder(videos, tmp_path / "out", vae, max_frames=0, progress=False)


def test_shard_names_and_collisions(tmp_path, vae):
    from pathlib import Path

    assert shard_name(Path("sub/dir/clip.v2.mp4")) == "sub__dir__clip.v2.safetensors"
    root = tmp_path / "videos"
    for name in ("clip.mp4", "clip.webm"):
        with VideoWriter(root / name) as writer:
            writer.write(moving_frames(1, 16, 16, seed=0))
    report = encode_folder(root, tmp_path / "out", vae, size=(16, 16), progress=False)
    assert report.written == 1
    assert report.failed == [(str(root / "clip.webm"), f"{root / 'clip.webm'}: its shard name clip.safetensors is "
                                                      f"taken by {root / 'clip.mp4'}; rename one")]


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    """A diffusers-style folder with a tiny random UMT5 encoder and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("text")
    words = ["a", "red", "square", "glides", "over", "blue", "sky"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "tokenizer")
    config = UMT5Config(vocab_size=len(vocab), d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    UMT5EncoderModel(config).save_pretrained(root / "text_encoder")
    return root


def test_captions_become_prompt_embeds(videos, vae_dir, text_encoder, tmp_path):
    (videos / "a.txt").write_text("a red square glides\n")
    out = tmp_path / "shards"
    code, printed = run(videos, "--vae", vae_dir, "--out", out, "--height", 32, "--width", 32, "--text-encoder",
                        text_encoder)
    assert code == 1 and "ignored" not in printed
    saved = load_file(out / "a.safetensors")
    assert saved["prompt_embeds"].shape == (512, 8) and saved["prompt_embeds"].dtype == torch.float32
    assert torch.equal(saved["prompt_embeds"], encode_prompts("a red square glides", text_encoder)[0])
    assert "prompt_embeds" not in load_file(out / "sub__b.safetensors")
    item = LatentShards(out).read(0, 0, 1, (4, 4))
    assert torch.equal(item["prompt_embeds"], saved["prompt_embeds"])

    code, printed = run(videos, "--vae", vae_dir, "--out", tmp_path / "plain", "--height", 32, "--width", 32)
    assert "1 caption file(s) ignored (no --text-encoder)" in printed
    assert "prompt_embeds" not in load_file(tmp_path / "plain" / "a.safetensors")


def test_bad_commands_fail_before_any_work(videos, vae_dir, tmp_path):
    out = tmp_path / "out"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    not_a_vae = tmp_path / "not_a_vae"
    not_a_vae.mkdir()
    (not_a_vae / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    cases = [
        ((tmp_path / "missing", "--vae", vae_dir, "--out", out), FileNotFoundError, "no video folder at"),
        ((a_file, "--vae", vae_dir, "--out", out), ConfigError, "VIDEOS must be a folder"),
        ((videos, "--vae", tmp_path / "novae", "--out", out), FileNotFoundError, "no VAE folder at"),
        ((videos, "--vae", vae_dir, "--out", a_file), ConfigError, "is an existing file"),
        ((videos, "--vae", vae_dir, "--out", out, "--height", 30, "--width", 32), ConfigError, "multiple of 8"),
        ((videos, "--vae", vae_dir, "--out", out, "--height", 32), ConfigError, "give both or neither"),
        ((videos, "--vae", vae_dir, "--out", out, "--max-frames", 0), ConfigError, "--max-frames: must be a positive"),
        ((videos, "--vae", vae_dir, "--out", out, "--text-encoder", tmp_path / "te"), FileNotFoundError, "te"),
        ((videos, "--vae", not_a_vae, "--out", out), ConfigError, "holds a AutoencoderKL, not an AutoencoderKLWan"),
        ((videos, "--vae", tmp_path, "--out", out), ConfigError, "no readable config.json"),
    ]
    for argv, error, message in cases:
        with pytest.raises(error, match=message):
            run(*argv)
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .mp4"):
        run(empty, "--vae", vae_dir, "--out", out)
    assert not out.exists()
