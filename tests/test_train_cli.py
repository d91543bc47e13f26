"""``memkit train`` end to end: the example configs, export into ``memkit generate``, a real kill and resume, one-line
errors, and ``memkit bench train``."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import SUBPROCESS_LIMIT
from safetensors.torch import load_file

from memkit.cli import main
from memkit.rollout.vae import tiny_wan_vae

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
FAST = ["--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "false"]


def memkit(*args, cwd, timeout=SUBPROCESS_LIMIT):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "memkit", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_example_config_parses(config, capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--config", str(CONFIGS / config), "--print_config"])
    assert done.value.code in (0, None)
    assert "class_path: memkit.train." in capsys.readouterr().out


@pytest.mark.parametrize("config", ["tiny_cpu_rolling.yaml", "tiny_cpu_self_rollout.yaml"])
def test_tiny_cpu_configs_train_and_export(tmp_path, monkeypatch, config):
    monkeypatch.chdir(tmp_path)
    export = tmp_path / "memory.safetensors"
    # a window of 3 chunks always holds a chunk that reads evicted frames, so the read-out gate gets gradient
    loss = ["--model.loss.init_args.rollout_chunks", "3", "--model.loss.init_args.window_chunks", "3",
            "--model.loss.init_args.generator_every", "1"] if "self_rollout" in config else []
    # the first generator step of DMD has a zero gradient (the critic starts as a copy of the teacher)
    steps = "4" if "self_rollout" in config else "2"
    assert main(["train", "--config", str(CONFIGS / config), "--trainer.max_steps", steps, "--data.frames", "9",
                 "--model.latent_size", "[8, 8]", "--export", str(export), *loss, *FAST]) == 0
    weights = load_file(export)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "out_gate" in k)  # trained off its zero init


def latent_config(tmp_path, steps, **trainer):
    """tiny_cpu.yaml on the default 16-channel tiny backbone: procedural RGB encoded by a tiny Wan VAE."""
    vae = tmp_path / "vae"
    if not vae.exists():
        tiny_wan_vae(z_dim=16).save_pretrained(vae)
    cfg = yaml.safe_load((CONFIGS / "tiny_cpu.yaml").read_text())
    cfg["model"]["backbone"]["overrides"] = {}
    cfg["model"]["latent_size"] = [8, 8]
    cfg["data"].update(vae=str(vae), frames=9, batch_size=1)
    cfg["data"].pop("val_source")
    cfg["trainer"].update(max_steps=steps, enable_progress_bar=False, **trainer)
    cfg["trainer"].pop("val_check_interval")
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    path = tmp_path / f"config_{steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def generate(tmp_path, name, *extra):
    out = tmp_path / f"{name}.safetensors"
    done = memkit("generate", "--seconds", "3", "--no-decode", "--sink-frames", "1", "--window-frames", "3",
                  "--save-latents", str(out), "--quiet", *extra, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_file(out)["latents"]


def test_a_trained_memory_loads_into_generate_and_changes_its_output(tmp_path):
    export = tmp_path / "memory.safetensors"
    done = memkit("train", "--config", str(latent_config(tmp_path, 6)), "--export", str(export), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"memory weights written to {export}" in done.stdout
    untrained = generate(tmp_path, "untrained")
    trained = generate(tmp_path, "trained", "--memory-weights", str(export))
    # the weights alone: they record the memory they were trained as (sink 1 + window 3 frames) and its chunks
    out = tmp_path / "alone.safetensors"
    done = memkit("generate", "--seconds", "3", "--no-decode", "--memory-weights", str(export), "--save-latents",
                  str(out), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(trained, load_file(out)["latents"])
    # the first chunks read no evicted frame, so they agree; later ones read the trained global memory
    assert torch.equal(trained[:, :, :3], untrained[:, :, :3])
    assert (trained[:, :, 9:] - untrained[:, :, 9:]).abs().max() > 1e-4


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    ckpts = tmp_path / "ckpts"
    every_step = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                   "init_args": {"dirpath": str(ckpts), "every_n_train_steps": 1, "save_top_k": -1,
                                 "filename": "{step}"}}]
    straight = tmp_path / "straight.safetensors"
    done = memkit("train", "--config", str(latent_config(tmp_path, 6)), "--export", str(straight), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    long_run = latent_config(tmp_path, 10_000, callbacks=every_step)
    proc = subprocess.Popen([sys.executable, "-m", "memkit", "train", "--config", str(long_run)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + SUBPROCESS_LIMIT
        while not (ckpts / "step=4.ckpt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (ckpts / "step=4.ckpt").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    resumed = tmp_path / "resumed.safetensors"
    done = memkit("train", "--config", str(latent_config(tmp_path, 6)), "--resume", str(ckpts / "step=3.ckpt"),
                  "--export", str(resumed), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags,message", [
    (["--model.memory.kind", "sink_window"], "memory 'sink_window' has no parameters to train"),
    (["--model.memory.kind", "hybrid_nope"], "model.memory.kind: unknown memory 'hybrid_nope'"),
    (["--model.lr", "fast"], 'model.lr'),
    (["--data.frames", "0"], "data.frames must be a positive int"),
    (["--resume", "missing.ckpt"], "no checkpoint at missing.ckpt"),
    (["--model.backbone.checkpoint", "missing_model"], "no checkpoint at missing_model"),
    (["--trainer.gradient_clip_val", "1.0"], "set model.gradient_clip_val instead"),
    (["--trainer.accumulate_grad_batches", "4"], "set model.accumulate_grad_batches instead"),
    (["--trainer.precision", "bf16-true", "--model.backbone.dtype", "bfloat16"], "use trainer.precision 'bf16-mixed'"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(CONFIGS / "tiny_cpu.yaml"), "--trainer.max_steps", "1", *flags]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


def test_a_bad_config_from_the_shell_prints_one_line_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "tiny_cpu.yaml").read_text().replace("kind: hybrid_gdn", "kind: hybrid_nope"))
    done = memkit("train", "--config", str(bad), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    assert done.stderr.splitlines()[-1].startswith("error: model.memory.kind")


def test_export_never_overwrites_an_existing_file(tmp_path):
    export = tmp_path / "memory.safetensors"
    export.write_bytes(b"keep me")
    done = memkit("train", "--config", str(CONFIGS / "tiny_cpu.yaml"), "--trainer.max_steps", "1", "--export",
                  str(export), cwd=tmp_path)
    assert done.returncode == 2 and "pass --overwrite" in done.stderr
    assert export.read_bytes() == b"keep me"


def test_bench_train_compares_each_loss_with_the_stock_step(capsys):
    assert main(["bench", "train", "--losses", "teacher_forcing", "rolling", "--frames", "6", "--latent-size", "8",
                 "8", "--steps", "1", "--warmup", "0", "--sink-frames", "1", "--window-frames", "3"]) == 0
    out = capsys.readouterr().out
    for row in ("stock fwd+bwd", "teacher_forcing", "rolling", "x stock"):
        assert row in out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of tiny_cpu.yaml trained to its max_steps: its last checkpoint and its exported weights."""
    root = tmp_path_factory.mktemp("finished")
    export = root / "memory.safetensors"
    done = memkit("train", "--config", str(CONFIGS / "tiny_cpu.yaml"), "--trainer.max_steps", "2",
                  "--trainer.logger.init_args.save_dir", str(root / "runs"), "--export", str(export), *FAST, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    (ckpt,) = (root / "runs").rglob("last.ckpt")
    return ckpt, export


def _same_weights(a, b) -> bool:
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_finished_run_exports_its_weights(finished_run, tmp_path):
    ckpt, export = finished_run
    again = tmp_path / "again.safetensors"
    done = memkit("train", "--config", str(CONFIGS / "tiny_cpu.yaml"), "--trainer.max_steps", "2", "--resume",
                  str(ckpt), "--export", str(again), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                  *FAST, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "had already reached max_steps=2" in done.stdout and f"memory weights written to {again}" in done.stdout
    assert _same_weights(again, export)


def test_export_only_writes_a_checkpoints_weights_and_trains_nothing(finished_run, tmp_path):
    ckpt, export = finished_run
    copy = tmp_path / "step2.ckpt"
    copy.write_bytes(ckpt.read_bytes())
    done = memkit("train", "--config", str(CONFIGS / "tiny_cpu.yaml"), "--resume", str(copy), "--export-only",
                  "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    beside = tmp_path / "step2.memory.safetensors"
    assert f"memory weights written to {beside}" in done.stdout and _same_weights(beside, export)
    assert not (tmp_path / "runs").exists()  # no run, no run folder
    again = memkit("train", "--config", str(CONFIGS / "tiny_cpu.yaml"), "--resume", str(copy), "--export-only",
                   cwd=tmp_path)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr  # an export is never overwritten


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(b"no checkpoint at all"), "is not a Lightning checkpoint; --resume takes a .ckpt"),
    (lambda p: __import__("safetensors.torch").torch.save_file({"w": torch.zeros(2)}, str(p)),
     "is not a Lightning checkpoint: it is a safetensors file"),
])
def test_resume_from_a_file_that_is_no_checkpoint_is_one_line(tmp_path, monkeypatch, capsys, make, message):
    monkeypatch.chdir(tmp_path)
    make(tmp_path / "weights.safetensors")
    assert main(["train", "--config", str(CONFIGS / "tiny_cpu.yaml"), "--resume", "weights.safetensors"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "weights.safetensors" in errors[0] and message in errors[0]
    assert "weights_only" not in errors[0] and not (tmp_path / "runs").exists()


def test_resume_from_another_setup_names_the_field(finished_run, tmp_path, monkeypatch, capsys):
    ckpt, _ = finished_run
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(CONFIGS / "tiny_cpu.yaml"), "--resume", str(ckpt), "--export-only",
                 "--model.memory.window_frames", "5"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: the checkpoint was trained on another setup; memory.window_frames: checkpoint 3, now 5"]


def test_a_checkpoint_from_before_place_codes_resumes(finished_run):
    """A memory config recorded without global_position compares by the place code its writes had."""
    from memkit.memory import memory_class
    from memkit.train.module import setup_differences

    ckpt, _ = finished_run
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["memkit"]
    here = {k: saved[k] for k in ("memory", "chunk_frames")}
    old = {**here, "memory": {k: v for k, v in saved["memory"].items() if k != "global_position"}}
    cls = memory_class(saved["memory"]["kind"])
    assert saved["memory"]["evict_aggregate"] == "frame_mean" and setup_differences(old, here, cls) == []
    token = {**here, "memory": {**here["memory"], "evict_aggregate": "token"}}
    old_token = {**old, "memory": {**old["memory"], "evict_aggregate": "token"}}
    assert setup_differences(old_token, token, cls) == ["memory.global_position: checkpoint 'none', now 'learned'"]


def test_bad_videos_are_all_named_and_leave_no_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a", "b", "c"):
        (videos / f"{name}.mp4").write_bytes(b"not a video " + name.encode())
    assert main(["train", "--config", str(CONFIGS / "tiny_cpu.yaml"), "--data.source", "memkit.data.VideoFolder",
                 "--data.source.root", str(videos), "--trainer.max_steps", "1", *FAST]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err.startswith("error: 3 of 3 samples of data.source cannot be used: ")
    assert all(f"{videos / name}.mp4 is not a readable video" in err for name in "abc")
    assert err.endswith("or set data.skip_bad_samples: true to train on the others")
    assert not (tmp_path / "runs").exists()


def test_sigterm_stops_training_in_one_line(tmp_path):
    ckpts = tmp_path / "ckpts"
    every_step = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                   "init_args": {"dirpath": str(ckpts), "every_n_train_steps": 1, "save_top_k": -1,
                                 "filename": "{step}"}}]
    config = latent_config(tmp_path, 10_000, callbacks=every_step)
    proc = subprocess.Popen([sys.executable, "-m", "memkit", "train", "--config", str(config), "--export",
                             str(tmp_path / "memory.safetensors")], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + SUBPROCESS_LIMIT
        while not (ckpts / "step=1.ckpt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (ckpts / "step=1.ckpt").exists()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: stopped by SIGTERM (outputs not finished were not written)"]
    assert "Traceback" not in err and not (tmp_path / "memory.safetensors").exists()


def test_memory_weights_refuse_another_backbone_and_contradicting_flags(finished_run, tmp_path):
    """tiny_cpu.yaml trains on a pixel-space tiny Wan (3 channels); generate's own tiny Wan has 16."""
    from memkit.memory import memory_weights_info

    ckpt, export = finished_run
    record = memory_weights_info(export)["record"]
    assert record["chunk_frames"] == 3 and record["latent_size"] == [16, 16] and record["trainable"] == "memory"
    assert record["backbone_spec"]["overrides"] == {"in_channels": 3, "out_channels": 3}
    alone, run = tmp_path / "alone.safetensors", tmp_path / "run.safetensors"
    for name, flags in ((alone, ["--memory-weights", str(export)]), (run, ["--from-run", str(ckpt)])):
        done = memkit("generate", "--seconds", "2", "--no-decode", "--save-latents", str(name), "--quiet", *flags,
                      cwd=tmp_path)  # the weights' own pixel-space backbone, rebuilt from its spec; or the run
        assert done.returncode == 0, done.stderr[-2000:]
    frames = load_file(alone)["latents"]
    assert frames.shape[1:] == (3, 33, 16, 16) and torch.equal(frames, load_file(run)["latents"])
    done = memkit("generate", "--seconds", "1", "--no-decode", "--memory-weights", str(export), "--size", "tiny",
                  "--quiet", cwd=tmp_path)  # another backbone, given
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"error: --memory-weights {export} was trained on another backbone: backbone "
                                  "config hash: weights ")
    assert "'in_channels': 3" in done.stderr
    clash = memkit("generate", "--seconds", "1", "--no-decode", "--memory-weights", str(export), "--window-frames",
                   "6", "--sink-frames", "1", "--quiet", cwd=tmp_path)
    assert clash.returncode == 2
    assert "was trained with other settings: --window-frames 6 (the weights: 3); leave these flags out" in clash.stderr


def test_from_run_hashes_its_checkpoint_only_for_a_saved_stream_and_refuses_a_changed_one(finished_run, tmp_path,
                                                                                           monkeypatch, capfd):
    """The checkpoint's sha256 is recorded in a saved stream and checked on --resume; a stream that is not saved
    does not read a (possibly gigabytes) checkpoint twice."""
    import shutil

    import memkit.generate as generate

    ckpt, _ = finished_run
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "last.ckpt"
    shutil.copy(ckpt, mine)
    hashed = []
    real = generate._sha256
    monkeypatch.setattr(generate, "_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    flags = ["--no-decode", "--quiet", "--seconds", "0.5"]
    assert main(["generate", "--from-run", str(mine), *flags]) == 0
    assert hashed == []
    assert main(["generate", "--from-run", str(mine), "--save-state", "s.safetensors", *flags]) == 0
    assert hashed == ["last.ckpt"]
    assert main(["generate", "--resume", "s.safetensors", "--save-state", "s2.safetensors", *flags]) == 0
    checkpoint = torch.load(mine, map_location="cpu", weights_only=True)
    name = next(k for k in checkpoint["state_dict"] if "out_gate" in k)
    checkpoint["state_dict"][name] = checkpoint["state_dict"][name] + 1.0
    torch.save(checkpoint, mine)
    capfd.readouterr()
    assert main(["generate", "--resume", "s.safetensors", *flags]) == 2
    err = capfd.readouterr().err
    assert f"--from-run {mine} changed since the stream was saved" in err and err.count("\n") == 1


def test_the_journey_from_a_folder_of_videos_to_a_generated_video(tmp_path):
    """mp4 clips -> memkit train (a VideoFolder through the tiny Wan VAE) -> memkit generate with the exported
    weights alone: the trained memory, on the backbone it was trained with, changes the chunks that read it."""
    from memkit.data import ProceduralVideos
    from memkit.rollout.video import VideoWriter

    videos = tmp_path / "videos"
    clips = ProceduralVideos(count=3, frames=40, seed=7)
    for i in range(3):
        rgb = clips.read(i, 0, 40, (64, 64))["video"]  # (3, F, H, W) in [-1, 1]
        with VideoWriter(videos / f"clip{i}.mp4", fps=16, crf=0) as writer:
            writer.write(((rgb.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    config = latent_config(tmp_path, 6)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["source"] = {"class_path": "memkit.data.VideoFolder", "init_args": {"root": str(videos)}}
    config.write_text(yaml.safe_dump(cfg))
    export = tmp_path / "memory.safetensors"
    done = memkit("train", "--config", str(config), "--export", str(export), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "trained.mp4"
    done = memkit("generate", "--seconds", "3", "--memory-weights", str(export), "--out", str(out),
                  "--save-latents", str(tmp_path / "trained.safetensors"), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.stat().st_size > 0
    trained = load_file(tmp_path / "trained.safetensors")["latents"]
    untrained = generate(tmp_path, "untrained")  # the same memory (sink 1 + window 3), untrained
    first_read = 6  # frames 1-2 leave the window at the second commit: the third chunk (6-8) reads them first
    assert torch.equal(trained[:, :, :first_read], untrained[:, :, :first_read])
    assert (trained[:, :, first_read:first_read + 3] - untrained[:, :, first_read:first_read + 3]).abs().max() > 1e-4


def test_the_journey_from_videos_to_a_video_on_a_pixel_space_run(tmp_path):
    """mp4 clips -> memkit train (tiny_cpu.yaml: a pixel-space tiny Wan, a VideoFolder) -> memkit generate
    --from-run with the run folder alone -> an mp4. Checked against the stream rebuilt here from the run's spec
    with an untrained memory: the chunks before the first eviction are the same (the same backbone, prompt and
    noise), the first chunk that reads the global memory differs (the trained memory)."""
    import adapters
    from adapters.loading import BackboneSpec, load_backbone
    from memkit import MemoryConfig
    from memkit.data import ProceduralVideos
    from memkit.rollout import FlowSchedule, StreamingGenerator
    from memkit.rollout.prompts import random_prompt_embeds
    from memkit.rollout.video import VideoWriter, read_video

    videos = tmp_path / "videos"
    clips = ProceduralVideos(count=3, frames=24, seed=7)
    for i in range(3):
        with VideoWriter(videos / f"clip{i}.mp4", fps=16, crf=0) as writer:
            writer.write(clips.read(i, 0, 24, (16, 16))["video"])
    cfg = yaml.safe_load((CONFIGS / "tiny_cpu.yaml").read_text())
    cfg["data"]["source"] = {"class_path": "memkit.data.VideoFolder", "init_args": {"root": str(videos)}}
    cfg["data"].pop("val_source")
    cfg["trainer"].update(max_steps=4, enable_progress_bar=False)
    cfg["trainer"].pop("val_check_interval")
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config = tmp_path / "pixel.yaml"
    config.write_text(yaml.safe_dump(cfg))
    done = memkit("train", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "tiny_cpu").glob("version_*")
    out, frames = tmp_path / "video.mp4", tmp_path / "frames.safetensors"
    done = memkit("generate", "--from-run", str(run), "--seconds", "1.5", "--out", str(out), "--save-latents",
                  str(frames), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained weights:" in done.stdout and "pixel-space" in done.stdout
    generated = load_file(frames)["latents"]
    video, _ = read_video(out)
    assert generated.shape == (1, 3, 24, 16, 16) and video.shape == (24, 16, 16, 3)
    expected = ((generated[0].clamp(-1, 1).permute(1, 2, 3, 0) + 1) * 127.5)
    # the mp4 holds the model's frames: H.264's 4:2:0 chroma blurs these noise-like 16x16 frames, so compare each
    # frame's mean colour
    assert (video.float().mean(dim=(1, 2)) - expected.mean(dim=(1, 2))).abs().max() < 6

    spec = BackboneSpec(**cfg["model"]["backbone"])
    model = load_backbone(spec).model
    memory = MemoryConfig(**cfg["model"]["memory"])
    handle = adapters.inject(model, memory, 3, latent_size=(16, 16))
    prompt = random_prompt_embeds(1, 16, model.config.text_dim, seed=0)
    gen = StreamingGenerator(handle, prompt, schedule=FlowSchedule((1000.0, 750.0, 500.0, 250.0), 5.0), seed=0,
                             progress=False)
    untrained = torch.cat([chunk.latents for chunk in gen.stream(8)], dim=2)
    first_read = 6  # sink 1 + window 3: frames 1-2 leave the window at the second commit; chunk 6-8 reads them
    assert torch.equal(generated[:, :, :first_read], untrained[:, :, :first_read])
    assert (generated[:, :, first_read:first_read + 3] - untrained[:, :, first_read:first_read + 3]).abs().max() > 1e-4
    done = memkit("generate", "--from-run", str(run), "--memory-weights", str(run / "memory.safetensors"),
                  "--quiet", cwd=tmp_path)
    assert done.returncode == 2 and "--from-run brings the run's backbone and trained memory; drop --memory-weights" \
        in done.stderr and done.stderr.count("\n") == 1


def test_a_run_rebuilds_in_python_with_the_weights_it_exported(finished_run):
    from memkit.train.runs import read_run

    ckpt, export = finished_run
    run = read_run(ckpt.parent.parent)  # the run folder: its checkpoints/last.ckpt
    assert run.checkpoint == ckpt and run.pixel_space and run.setup["trainable"] == "memory"
    handle = run.build()
    exported = load_file(export)
    mine = handle.model.state_dict()
    assert exported and all(torch.equal(t, mine[name]) for name, t in exported.items())
