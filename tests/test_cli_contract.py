"""The command line's contract: every bad invocation is one line on stderr and a non-zero exit, before any work
and without touching an existing file; a saved stream continues from its file alone, bit for bit; forks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SUBPROCESS_LIMIT
from safetensors.torch import load_file, save_file

from memkit.cli import main
from memkit.rollout.video import read_video

FAST = ["--quiet", "--dtype", "float32", "--device", "cpu"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A folder with a saved stream (2 chunks, a prompt switch at chunk 1), its video and latents."""
    root = tmp_path_factory.mktemp("saved")
    code = main(["generate", "--seconds", "1", "--switch", "1", "--crf", "0", "--out", str(root / "a.mp4"),
                 "--save-latents", str(root / "a.safetensors"), "--save-state", str(root / "s.safetensors"), *FAST])
    assert code == 0
    return root


@pytest.fixture
def files(tmp_path, saved, monkeypatch):
    """A working folder holding files a bad command must leave alone, byte for byte."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing.mp4").write_bytes(b"an existing video")
    (tmp_path / "existing.png").write_bytes(b"an existing plot")
    (tmp_path / "existing.safetensors").write_bytes(b"an existing state")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    (tmp_path / "a_file").write_bytes(b"a file where a folder would have to be")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "demo_out").mkdir()
    (tmp_path / "demo_out" / "world.mp4").write_bytes(b"an earlier demo")
    state = (saved / "s.safetensors").read_bytes()
    (tmp_path / "s.safetensors").write_bytes(state)
    (tmp_path / "truncated.safetensors").write_bytes(state[: len(state) // 2])
    save_file({"not_latents": torch.zeros(2)}, tmp_path / "no_latents.safetensors")
    shards = tmp_path / "latent_folder"  # a folder of latents given as a Wan-format checkpoint
    shards.mkdir()
    for name in ("x", "y"):
        save_file({"latents": torch.zeros(1, 16, 3, 8, 8)}, shards / f"{name}.safetensors")
    save_file({"prompt": torch.zeros(4, 32)}, tmp_path / "prompts.safetensors")
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


GENERATE = ["generate", *FAST]
BAD = [
    # (argv, exit code, words of the message)
    (["generate", "--seconds", "0"], 2, "--seconds: must be a positive number, got 0"),
    (["generate", "--seconds", "-1"], 2, "--seconds"),
    (["generate", "--seconds", "ten"], 2, "--seconds: must be a number, got 'ten'"),
    (["generate", "--seconds", "nan"], 2, "--seconds: must be finite"),
    (["generate", "--seconds=--"], 2, "argument --seconds: expected a value, got '--'"),
    (["bench", "speed", "--chunks=--"], 2, "argument --chunks: expected a value, got '--'"),
    ([*GENERATE, "--seconds", "1", "--total-seconds", "2"], 2, "not both"),
    (["generate", "--device", "cuda:99"], 2, "--device cuda:99"),
    (["generate", "--device", "toaster"], 2, "--device 'toaster' is not a torch device"),
    ([*GENERATE, "--out", "existing.mp4"], 2, "--out existing.mp4 exists; pass --overwrite"),
    ([*GENERATE, "--out", "a_dir"], 2, "--out a_dir is a folder"),
    ([*GENERATE, "--save-state", "existing.safetensors"], 2, "--save-state existing.safetensors exists"),
    ([*GENERATE, "--save-state", "a_dir"], 2, "--save-state a_dir is a folder"),
    ([*GENERATE, "--save-latents", "a_file/l.safetensors"], 2, "a_file is a file"),
    ([*GENERATE, "--out", "v.mp4", "--save-latents", "v.mp4"], 2, "name the same file"),
    ([*GENERATE, "--prefix", "garbage.safetensors"], 2, "garbage.safetensors is not a readable safetensors file"),
    ([*GENERATE, "--prefix", "no_latents.safetensors"], 2, "has no 'latents' tensor"),
    ([*GENERATE, "--prefix", "missing.png"], 2, "--prefix missing.png: no such file"),
    ([*GENERATE, "--resume", "missing.safetensors"], 2, "--resume missing.safetensors: no such file"),
    ([*GENERATE, "--resume", "garbage.safetensors"], 2, "not a readable safetensors file"),
    ([*GENERATE, "--resume", "truncated.safetensors"], 2, "truncated or corrupt"),
    ([*GENERATE, "--resume", "existing.safetensors"], 2, "not a readable safetensors file"),
    ([*GENERATE, "--resume", "s.safetensors", "--window-frames", "9", "--memory", "full"], 2,
     "memory: file hybrid_gdn, flag full; window_frames: file 6, flag 9"),
    ([*GENERATE, "--resume", "s.safetensors", "--seed", "5"], 2, "seed: file 0, flag 5; --seed, --steps"),
    ([*GENERATE, "--resume", "s.safetensors", "--height", "32"], 2, "height: file 64, flag 32"),
    ([*GENERATE, "--resume", "s.safetensors", "--fork", "--chunk-frames", "2"], 2, "chunk_frames: file 3, flag 2"),
    ([*GENERATE, "--resume", "s.safetensors", "--dtype", "float64"], 2, "dtype: file float32, flag float64"),
    ([*GENERATE, "--resume", "s.safetensors", "--switch", "3"], 2, "contradicts the saved stream's switches [1]"),
    ([*GENERATE, "--resume", "s.safetensors", "--total-seconds", "1"], 2, "nothing to generate"),
    ([*GENERATE, "--resume", "s.safetensors", "--prefix", "no_latents.safetensors"], 2, "give one of them"),
    ([*GENERATE, "--fork", "--seed", "3"], 2, "--fork forks a saved stream: it needs --resume"),
    ([*GENERATE, "--no-decode", "--out", "v.mp4"], 2, "--out has nothing to write with --no-decode"),
    ([*GENERATE, "--height", "60"], 2, "--height must be a multiple of 8, got 60"),
    ([*GENERATE, "--width", "0"], 2, "--width: must be a positive integer, got 0"),
    ([*GENERATE, "--prompt", "a", "--prompt-embeds", "prompts.safetensors"], 2, "not both"),
    ([*GENERATE, "--prompt", "a", "--prompt", "b"], 2, "2 --prompt texts need 1 --switch chunks, got 0"),
    ([*GENERATE, "--prompt", "a cat"], 2, "--prompt needs a text encoder"),
    ([*GENERATE, "--checkpoint", "latent_folder"], 2, "x.safetensors holds no Wan transformer weights"),
    ([*GENERATE, "--memory", "nope"], 2, "unknown memory 'nope'"),
    ([*GENERATE, "--context-noise", "1000"], 2, "--context-noise must lie in [0, 1000)"),
    ([*GENERATE, "--seconds", "1", "--switch", "5"], 2, "prompt switch at chunk 5 is out of range"),
    ([*GENERATE, "--memory-weights", "garbage.safetensors"], 2, "not a readable safetensors file"),
    ([*GENERATE, "--memory-weights", "a_dir"], 2, "--memory-weights a_dir is a folder"),
    ([*GENERATE, "--steps", "250", "500"], 2, "timesteps must decrease"),
    ([*GENERATE, "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["demo", "--out", "a_file"], 2, "--out a_file is a file"),
    (["demo", "--out", "demo_out"], 2, "world.mp4 exists; pass --overwrite"),
    (["bench", "quality", "--out", "a_file"], 2, "--out a_file is a file"),
    (["bench", "quality", "--quick", "--eval-frames", "10"], 2, "whole chunks of 3 frames"),
    (["bench", "quality", "--variants", "nope"], 2, "invalid choice: 'nope'"),
    (["bench", "quality", "--steps", "0"], 2, "--steps: must be a positive integer, got 0"),
    (["demo", "--chunks", "-1"], 2, "--chunks: must be a positive integer, got -1"),
    (["bench", "memory", "--chunks", "0"], 2, "--chunks: must be a positive integer, got 0"),
    (["bench", "memory", "--chunks", "2", "--plot", "existing.png"], 2, "--plot existing.png exists"),
    (["bench", "stream", "--device", "cuda:99"], 2, "--device cuda:99"),
    (["bench", "train", "--frames", "2"], 2, "shorter than one chunk"),
    (["bench", "train", "--device", "cuda:99"], 2, "--device cuda:99"),
    (["encode", "missing_folder", "--vae", "a_dir", "--out", "shards"], 2, "no video folder at missing_folder"),
    (["encode", "a_dir", "--vae", "a_dir", "--out", "shards", "--max-frames", "0"], 2, "--max-frames"),
    (["train", "--bogus.flag", "1"], 2, "bogus"),
]


@pytest.mark.parametrize("argv, code, message", BAD, ids=[" ".join(b[0])[:60] for b in BAD])
def test_a_bad_invocation_is_one_line_and_touches_nothing(files, capfd, argv, code, message):
    before = snapshot(files)
    assert main(argv) == code
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert snapshot(files) == before  # no file changed, none added (no temporary left behind), none removed


def test_there_are_enough_bad_invocations():
    assert len(BAD) >= 25


def memkit(*argv, cwd):
    env = {**os.environ, "COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "memkit", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=SUBPROCESS_LIMIT)


def test_from_the_shell_errors_are_one_line_and_debug_shows_the_traceback(files):
    done = memkit("generate", "--resume", "truncated.safetensors", "--quiet", cwd=files)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: truncated.safetensors is not a readable safetensors file")
    debug = memkit("generate", "--resume", "truncated.safetensors", "--quiet", "--debug", cwd=files)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("error: ")


def test_an_unexpected_failure_is_one_line_with_exit_code_1(files, capfd, monkeypatch):
    import memkit.rollout.generator as generator

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access\nwas encountered")

    monkeypatch.setattr(generator, "denoise_chunk", broken)
    assert main(["generate", *FAST, "--seconds", "1", "--out", "new.mp4", "--save-state", "new.safetensors"]) == 1
    err = capfd.readouterr().err
    assert err.strip() == ("error: RuntimeError: CUDA error: an illegal memory access was encountered "
                           "(memkit --debug ... shows where)")
    assert not (files / "new.mp4").exists() and not (files / "new.safetensors").exists()


def test_a_run_that_fails_midway_keeps_the_existing_output(files, capfd, monkeypatch):
    """--overwrite replaces a file only with a finished one: a failure after some chunks leaves the old file."""
    import memkit.rollout.generator as generator

    calls, real = [], generator.commit_chunk

    def fails_on_the_sixth_chunk(*args, **kwargs):  # after 57 frames: past the H.264 encoder's look-ahead
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generator, "commit_chunk", fails_on_the_sixth_chunk)
    before = snapshot(files)
    assert main(["generate", *FAST, "--seconds", "5", "--out", "existing.mp4", "--overwrite"]) == 130
    assert "interrupted" in capfd.readouterr().err
    assert snapshot(files) == before


def test_resume_from_the_file_alone_equals_one_uninterrupted_run(saved, tmp_path, capfd):
    """Frames and latents, bit for bit: the stream was saved after 2 chunks (with a prompt switch) and continued
    with nothing but --resume; the video is lossless (--crf 0), so decoded frames compare exactly."""
    whole, whole_latents = tmp_path / "whole.mp4", tmp_path / "whole.safetensors"
    assert main(["generate", "--total-seconds", "2.8", "--switch", "1", "--crf", "0", "--out", str(whole),
                 "--save-latents", str(whole_latents), *FAST]) == 0
    rest, rest_latents = tmp_path / "rest.mp4", tmp_path / "rest.safetensors"
    assert main(["generate", "--resume", str(saved / "s.safetensors"), "--seconds", "1.5", "--crf", "0", "--quiet",
                 "--out", str(rest), "--save-latents", str(rest_latents)]) == 0
    out = " ".join(capfd.readouterr().out.split())
    assert "resuming after chunk 2 (6 latent frames" in out and "prompts: as saved" in out
    latents = torch.cat([load_file(saved / "a.safetensors")["latents"], load_file(rest_latents)["latents"]], dim=2)
    assert torch.equal(latents, load_file(whole_latents)["latents"])
    frames = torch.cat([read_video(saved / "a.mp4")[0], read_video(rest)[0]])
    reference = read_video(whole)[0]
    assert frames.shape == reference.shape == (4 * 12 - 3, 64, 64, 3)
    assert torch.equal(frames, reference)


def test_forks_with_the_same_seed_continue_and_with_another_seed_differ(saved, tmp_path):
    runs = {}
    for name, extra in (("resume", []), ("same", ["--fork", "--seed", "0"]), ("other", ["--fork", "--seed", "7"])):
        path = tmp_path / f"{name}.safetensors"
        assert main(["generate", "--resume", str(saved / "s.safetensors"), "--seconds", "0.75", "--no-decode",
                     "--save-latents", str(path), "--save-state", str(tmp_path / f"{name}_state.safetensors"),
                     "--quiet", *extra]) == 0
        runs[name] = load_file(path)["latents"]
    assert torch.equal(runs["same"], runs["resume"])
    assert (runs["other"] - runs["resume"]).abs().mean() > 1e-2 * runs["resume"].abs().mean()
    from memkit.state import StreamState

    assert StreamState.load(tmp_path / "other_state.safetensors").settings["seed"] == 7
    assert StreamState.load(tmp_path / "other_state.safetensors").settings["backbone_seed"] == 0


def test_seconds_is_the_new_video_alone_or_with_resume_and_prefix(saved, tmp_path, capfd):
    # alone: 1 s = 16 frames asked, chunks of 12 frames (the first makes 9) -> 2 chunks, 21 frames
    assert read_video(saved / "a.mp4")[0].shape[0] == 21
    # resumed: 1 s more -> 2 chunks of 12 frames
    more = tmp_path / "more.mp4"
    assert main(["generate", "--resume", str(saved / "s.safetensors"), "--seconds", "1", "--out", str(more),
                 "--quiet"]) == 0
    assert read_video(more)[0].shape[0] == 24
    # after a prefix: the prefix's frames, then 1 s of new ones
    ext = tmp_path / "ext.mp4"
    assert main(["generate", *FAST, "--prefix", str(saved / "a.safetensors"), "--seconds", "1", "--out",
                 str(ext)]) == 0
    assert read_video(ext)[0].shape[0] == 21 + 24
    # --total-seconds counts the resumed part: 21 frames saved, 2 s = 32 -> 11 more -> 1 chunk
    total = tmp_path / "total.mp4"
    assert main(["generate", "--resume", str(saved / "s.safetensors"), "--total-seconds", "2", "--out",
                 str(total), "--quiet"]) == 0
    assert read_video(total)[0].shape[0] == 12
    capfd.readouterr()


def test_overwrite_replaces_an_existing_output(files):
    assert main(["generate", *FAST, "--seconds", "0.5", "--out", "existing.mp4", "--overwrite"]) == 0
    assert read_video(files / "existing.mp4")[0].shape[0] == 9
    assert not [p for p in files.iterdir() if p.name.startswith(".")]  # no temporary left


def test_resume_refuses_memory_weights_that_changed(tmp_path, capfd, monkeypatch):
    import adapters
    import memkit

    monkeypatch.chdir(tmp_path)
    model = adapters.random_wan("tiny")
    adapters.inject(model, memkit.MemoryConfig(kind="hybrid_gdn", rope_mode="relative"), latent_size=(8, 8))
    memkit.save_memory(model, "w.safetensors")
    assert main(["generate", *FAST, "--seconds", "0.5", "--no-decode", "--memory-weights", "w.safetensors",
                 "--save-state", "s.safetensors"]) == 0
    with torch.no_grad():
        next(adapters.get_handle(model).memory_parameters()).add_(1.0)
    memkit.save_memory(model, "w.safetensors")
    capfd.readouterr()
    assert main(["generate", "--resume", "s.safetensors", "--seconds", "0.5", "--no-decode", "--quiet"]) == 2
    assert "changed since the stream was saved" in capfd.readouterr().err
