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
from safetensors.torch import load_file

from memkit.cli import main
from memkit.rollout.vae import tiny_wan_vae

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
FAST = ["--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "false"]


def memkit(*args, cwd, timeout=300):
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
    again = generate(tmp_path, "again", "--memory-weights", str(export))
    assert torch.equal(trained, again)
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
        deadline = time.time() + 240
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
