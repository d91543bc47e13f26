"""Outputs and signals: a path that cannot be created is refused before any work, files get the umask's mode,
the probe leaves nothing behind, and SIGTERM / SIGHUP stop a command as Ctrl-C does (no partial file, one line,
exit 128 + the signal)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SUBPROCESS_LIMIT

from memkit.cli import main
from memkit.errors import ConfigError
from memkit.outputs import atomic_output, check_output, check_output_folder
from memkit.state import io

FAST = ["--quiet", "--dtype", "float32", "--device", "cpu"]


def _cannot_create(path: Path) -> bool:
    try:
        path.touch()
    except OSError:
        return True
    path.unlink()
    return False


UNWRITABLE = Path("/sys/memkit_probe.mp4")  # sysfs: nobody creates files there, root included


@pytest.mark.skipif(not _cannot_create(UNWRITABLE), reason="this machine lets us create a file in /sys")
@pytest.mark.parametrize("argv", [
    ["generate", *FAST, "--seconds", "1", "--out", str(UNWRITABLE)],
    ["generate", *FAST, "--seconds", "1", "--save-state", str(UNWRITABLE.with_suffix(".safetensors"))],
    ["bench", "memory", "--chunks", "4", "--plot", str(UNWRITABLE.with_suffix(".png"))],
])
def test_an_output_that_cannot_be_created_is_refused_before_any_work(argv, capsys, monkeypatch):
    import memkit.rollout.generator as generator

    monkeypatch.setattr(generator, "denoise_chunk", lambda *a, **k: pytest.fail("work started"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot be created" in err and "memkit_probe" in err


def test_the_probe_creates_and_removes_what_the_output_needs(tmp_path):
    deep = tmp_path / "a" / "b" / "out.mp4"
    assert check_output(deep, "--out") == deep
    assert list(tmp_path.iterdir()) == []  # neither the folders nor the file stay
    existing = tmp_path / "keep.mp4"
    existing.write_bytes(b"old")
    check_output(existing, "--out", overwrite=True)
    assert existing.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"]
    folder = tmp_path / "reports"
    check_output_folder(folder, "--out", ["a.md", "b.png"])
    assert not folder.exists()


def test_the_probe_names_a_file_where_a_folder_must_go(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file, so the folder for it cannot be made"):
        check_output(tmp_path / "f" / "out.mp4", "--out")


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_get_the_mode_of_a_new_file_under_the_umask(tmp_path, umask):
    """Every writer ends in atomic_output (or the video writer's rename); safetensors writes its own 0600 file."""
    from memkit.rollout.video import VideoWriter

    old = os.umask(umask)
    try:
        with atomic_output(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
        io.write(tmp_path / "b.safetensors", {"x": torch.zeros(2)}, {"type": "test"})
        with VideoWriter(tmp_path / "c.mp4", fps=8) as writer:
            writer.write(torch.zeros(2, 16, 16, 3, dtype=torch.uint8))
        reference = tmp_path / "reference"  # what the OS gives a plain new file
        reference.touch()
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert reference.stat().st_mode & 0o777 == want
    for name in ("a.txt", "b.safetensors", "c.mp4"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name


def test_a_failure_inside_atomic_output_deletes_its_temporary_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def _memkit(*argv, cwd):
    env = {**os.environ, "COLUMNS": "300", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "memkit", *map(str, argv)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_stops_generate_like_ctrl_c(tmp_path, signum, code):
    """A run of 31 years of video: it says so, estimates its time after its first chunks, and a signal then
    leaves no partial video behind."""
    proc = _memkit("generate", *FAST, "--seconds", "1e9", "--out", "long.mp4", cwd=tmp_path)
    lines = []
    try:
        for line in proc.stdout:  # the estimate comes after 3 chunks, when the video's temporary file exists
            lines.append(line)
            if "per chunk" in line:
                break
        assert any(name.endswith(".partial") for name in os.listdir(tmp_path)), lines
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=SUBPROCESS_LIMIT)
    finally:
        proc.kill()
    text = "".join(lines)
    assert "a long run: 1,333,333,334 chunks" in text and "31.7 years of video" in text
    assert proc.returncode == code
    assert err.strip() == f"error: stopped by {signal.Signals(signum).name} (outputs not finished were not written)"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("spelling", ["a/../v.mp4", "./v.mp4", "b/../a/../v.mp4", "link/v.mp4"])
def test_two_flags_on_one_file_are_refused_however_the_path_is_spelled(tmp_path, monkeypatch, spelling):
    from memkit.outputs import check_outputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="--save-latents and --out name the same file"):
        check_outputs({"--save-latents": "v.mp4", "--out": spelling})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "link"]


@pytest.mark.parametrize("existing", ["recall.md", "recall.json", "recall.png"])
def test_an_output_folder_refuses_each_of_its_files(tmp_path, existing):
    (tmp_path / existing).write_text("keep")
    with pytest.raises(ConfigError, match=f"{existing} exists; pass --overwrite"):
        check_output_folder(tmp_path, "--out", ["recall.md", "recall.json", "recall.png"])
    assert check_output_folder(tmp_path, "--out", ["recall.md", "recall.json", "recall.png"], overwrite=True)
    assert (tmp_path / existing).read_text() == "keep"
