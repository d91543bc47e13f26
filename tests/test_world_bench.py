"""The world benchmark end to end: action-conditioned training data, per-chunk prompts, the world model file,
``memkit bench quality`` on a tiny budget, and the models shipped for the demo."""

import json
import shutil

import pytest
import torch
from test_train import MEMORY, fixed_batch, module_for

from memkit.bench.quality import VARIANTS, QualitySetup, quick_setup
from memkit.cli import main
from memkit.data import ClipDataModule, WorldVideos, action_embeddings
from memkit.data.datamodule import DataRequirements, collate_clips
from memkit.demo import WORLD_MODELS, asset
from memkit.errors import CheckpointError, ConfigError, ShapeError, StateFormatError
from memkit.rollout.world import WorldModel
from memkit.train import RollingMemory, SelfRolloutDMD, TeacherForcing


def world_data(frames=12, chunk_frames=3, text_dim=32, prompt_len=4):
    source = WorldVideos(count=3, frames=60, seed=5, view_cells=4, world_cells=8, objects=4)
    dm = ClipDataModule(source, frames=frames, batch_size=2, prompt_len=prompt_len, seed=1)
    dm.requirements = DataRequirements(channels=3, latent_size=(16, 16), text_dim=text_dim, chunk_frames=chunk_frames)
    return source, dm


def test_world_clips_start_on_action_segments_and_carry_one_action_prompt_per_chunk():
    from memkit.data.datamodule import ClipDataset

    source, dm = world_data()
    dataset = ClipDataset(source, dm, random_crop=True)
    table = action_embeddings(32, 4)
    for index in range(3):
        for epoch in range(4):
            sample = dataset[(index, epoch)]
            video = sample["video"] if "video" in sample else sample["latents"]
            # find where the crop starts by matching the frames against the whole video
            whole = source.read(index, 0, 60, (16, 16))["video"]
            start = next(s for s in range(0, 60 - 12 + 1) if torch.equal(whole[:, s: s + 12], video))
            assert start % source.crop_step == 0
            actions = source.actions(index)[start: start + 12]
            assert sample["prompt_embeds"].shape == (4, 4, 32)
            for c in range(4):
                assert torch.equal(sample["prompt_embeds"][c], table[actions[3 * c]])
                assert (actions[3 * c: 3 * c + 3] == actions[3 * c]).all()  # one action per chunk
    batch = collate_clips([dataset[(0, 0)], dataset[(1, 0)]])
    assert batch["prompt_embeds"].shape == (2, 4, 4, 32)


def test_per_chunk_prompts_give_the_losses_of_the_clip_prompt_when_equal_and_act_per_chunk():
    """Chunk by chunk with one prompt each equals the one-pass segment when the prompts are the same (streaming
    equals parallel); changing chunk 2's prompt changes the loss of chunks 2 and 3 only."""
    loss = TeacherForcing()
    module = module_for(loss, memory=MEMORY)
    batch = fixed_batch(frames=12)
    per_chunk = dict(batch, prompt_embeds=batch["prompt_embeds"][:, None].repeat(1, 4, 1, 1))
    whole = loss.evaluate(module, batch, torch.Generator().manual_seed(0))["per_chunk"]
    chunked = loss.evaluate(module, per_chunk, torch.Generator().manual_seed(0))["per_chunk"]
    assert torch.allclose(whole, chunked, rtol=1e-5, atol=1e-7)
    changed = per_chunk["prompt_embeds"].clone()
    changed[:, 2] = torch.randn_like(changed[:, 2])
    other = loss.evaluate(module, dict(batch, prompt_embeds=changed), torch.Generator().manual_seed(0))["per_chunk"]
    assert torch.allclose(other[:2], whole[:2], rtol=1e-5, atol=1e-7)
    assert (other[2:] - whole[2:]).abs().min() > 1e-6
    rolling = RollingMemory(tbptt_chunks=2)
    module.loss = rolling
    assert torch.allclose(rolling.evaluate(module, per_chunk, torch.Generator().manual_seed(0))["per_chunk"],
                          rolling.evaluate(module, batch, torch.Generator().manual_seed(0))["per_chunk"],
                          rtol=1e-5, atol=1e-7)


def test_per_chunk_prompts_are_refused_where_a_loss_cannot_use_them():
    batch = fixed_batch(frames=12)
    per_chunk = dict(batch, prompt_embeds=batch["prompt_embeds"][:, None].repeat(1, 4, 1, 1))
    noisy = TeacherForcing(context="noisy")
    with pytest.raises(ConfigError, match="per-chunk prompts"):
        noisy.evaluate(module_for(noisy), per_chunk, torch.Generator().manual_seed(0))
    too_few = dict(batch, prompt_embeds=per_chunk["prompt_embeds"][:, :2])
    clean = TeacherForcing()
    with pytest.raises(ConfigError, match="2 prompts for 4 chunks"):
        clean.evaluate(module_for(clean), too_few, torch.Generator().manual_seed(0))
    from test_train import PIXEL

    from adapters.loading import BackboneSpec

    dmd = SelfRolloutDMD(teacher=BackboneSpec(size="tiny", seed=1, overrides=PIXEL), rollout_chunks=2,
                         window_chunks=1)
    with pytest.raises(ConfigError, match="self_rollout takes one prompt per clip"):
        dmd.evaluate(module_for(dmd), per_chunk, torch.Generator().manual_seed(0))


def test_a_world_source_is_refused_where_its_actions_cannot_be_one_prompt_per_chunk(tmp_path):
    def setup(source, **kw):
        dm = ClipDataModule(source, frames=12, batch_size=2, **kw)
        dm.requirements = DataRequirements(channels=3, latent_size=(16, 16), text_dim=32, chunk_frames=3)
        dm.setup()

    world = dict(count=2, frames=24, seed=5, view_cells=4, world_cells=8, objects=2)
    setup(WorldVideos(**world, action_frames=6))  # two chunks per action segment: fine
    with pytest.raises(ConfigError, match="straddle two actions"):
        setup(WorldVideos(**world, action_frames=2))
    with pytest.raises(ConfigError, match="data.vae is set"):
        setup(WorldVideos(**world), vae=str(tmp_path))
    with pytest.raises(ConfigError, match="data.prompt_embeds would be ignored"):
        setup(WorldVideos(**world), prompt_embeds=str(tmp_path / "p.safetensors"))


def test_a_world_model_file_round_trips_and_a_truncated_or_foreign_one_fails_cleanly(tmp_path):
    setup = quick_setup()
    model = WorldModel(setup.backbone(), setup.memory("hybrid_blockwise"), (16, 16), prompt_len=setup.prompt_len)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "w.safetensors"
    model.save(path)
    again = WorldModel.load(path)
    world = setup.world(1, 12, 3)
    truth = world.read(0, 0, 12, (16, 16))["video"]
    a = model.rollout(truth[:, :3], world.actions(0), 12, seed=4).video
    b = again.rollout(truth[:, :3], world.actions(0), 12, seed=4).video
    assert torch.equal(a, b) and torch.equal(a[:, :3], truth[:, :3])
    assert not torch.equal(a, model.rollout(truth[:, :3], world.actions(0), 12, seed=5).video)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(StateFormatError, match="truncated or corrupt"):
        WorldModel.load(tmp_path / "cut.safetensors")
    model.handle.init_state(1).save(tmp_path / "state.safetensors")
    with pytest.raises(CheckpointError, match="not a world model"):
        WorldModel.load(tmp_path / "state.safetensors")
    bad = world.actions(0).clone()
    bad[5] = 7
    with pytest.raises(ConfigError, match="action ids"):
        model.rollout(truth[:, :3], bad, 12)
    with pytest.raises(ShapeError, match="history must be"):
        model.rollout(truth[:, :3], world.actions(0), 12, history=truth[:, :9])


def test_quality_bench_runs_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    out, models = tmp_path / "results", tmp_path / "models"
    assert main(["bench", "quality", "--quick", "--steps", "3", "--out", str(out), "--export", str(models)]) == 0
    table = (out / "quality.md").read_text()
    assert all(f"| `{kind}` |" in table for kind in VARIANTS) and "Wall time" in table
    report = json.loads((out / "quality.json").read_text())
    assert set(report["results"]) == set(VARIANTS) and report["setup"]["steps"] == 3  # --quick keeps given flags
    for r in report["results"].values():
        assert set(r["psnr"]) == {"revisit", "new", "all"} and r["psnr"]["all"] > 0
        assert len(r["drift"]) == report["setup"]["eval_frames"] - report["setup"]["chunk_frames"]
    assert report["results"]["full"]["state_bytes"] > report["results"]["sink_window"]["state_bytes"]
    assert (out / "quality.png").stat().st_size > 10_000 and (out / "quality_strip.png").stat().st_size > 10_000
    assert WorldModel.load(models / "world_hybrid_gdn.safetensors").memory.kind == "hybrid_gdn"
    before = (out / "quality.md").read_bytes()
    assert main(["bench", "quality", "--quick", "--out", str(out)]) == 2  # never replaces a report by default
    assert "quality.md exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "quality.md").read_bytes() == before


@pytest.mark.parametrize("name", list(WORLD_MODELS))
def test_the_shipped_world_models_load_play_the_world_and_fail_cleanly_when_truncated(name, tmp_path):
    path = asset(WORLD_MODELS[name])
    model = WorldModel.load(str(path))
    assert model.memory.kind == name and path.stat().st_size < 8 * 2**20
    setup = QualitySetup(**model.meta["training"]["setup"])
    world = setup.world(1, 12, 777)
    truth = world.read(0, 0, 12, (setup.frame_size, setup.frame_size))["video"]
    video = model.rollout(truth[:, :3], world.actions(0), 12).video
    true_past = model.rollout(truth[:, :3], world.actions(0), 12, history=truth).video
    assert torch.equal(video[:, :3], truth[:, :3])

    def psnr(a):
        return 10 * torch.log10(4.0 / (a - truth[:, 3:]).pow(2).mean())

    flat = truth[:, 3:].mean(dim=(2, 3), keepdim=True).expand_as(truth[:, 3:])  # each frame's own mean colour
    # It learned the world beyond its colours: from the true past by a wide margin, and in its own rollout.
    assert psnr(true_past[:, 3:]) > psnr(flat) + 3.0
    assert psnr(video[:, 3:]) > psnr(flat) + 1.0
    cut = tmp_path / "cut.safetensors"
    shutil.copyfile(path, cut)
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size - 1000)
    with pytest.raises(StateFormatError, match="truncated or corrupt"):
        WorldModel.load(cut)


@pytest.mark.parametrize("flags, message", [
    (["--clip-frames", "6"], "never learns"),  # the quick setup's global memory is first read by frame 6
    (["--variants", "full", "full"], "lists a variant twice"),
    (["--eval-frames", "2001"], "RoPE table"),
    (["--clip-frames", "243"], "at most the training videos"),
])
def test_quality_bench_refuses_a_setup_that_cannot_work_before_training(flags, message, tmp_path, capsys):
    assert main(["bench", "quality", "--quick", "--out", str(tmp_path / "r"), *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "r").exists()
