"""ClipDataModule: clips cut to whole chunks at seeded offsets, prompts, bad samples, exact mid-epoch resumption."""

import warnings

import lightning as L
import pytest
import torch

import memkit
from adapters.loading import BackboneSpec
from memkit.data import ClipDataModule, ClipSampler, DataRequirements, collate_clips
from memkit.data.sources import ClipSource
from memkit.errors import ConfigError, DataError
from memkit.train import MemoryFinetune, TeacherForcing

warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
REQS = DataRequirements(channels=3, latent_size=(4, 4), text_dim=8, chunk_frames=3)


class Counting(ClipSource):
    """Latents whose every value is ``index * 1000 + frame``: the clip says where it was cut from."""

    modality = "latents"

    def __init__(self, lengths, channels=3, prompt=None, bad=()):
        self.lengths, self.channels, self.prompt, self.bad = list(lengths), channels, prompt, set(bad)

    def __len__(self):
        return len(self.lengths)

    def describe(self, index):
        return f"clip{index}.safetensors"

    def num_frames(self, index):
        if index in self.bad:
            raise DataError(f"{self.describe(index)} is not a readable safetensors file")
        return self.lengths[index]

    def read(self, index, start, frames, size):
        values = index * 1000 + torch.arange(start, start + frames, dtype=torch.float32)
        item = {"latents": values.view(1, frames, 1, 1).expand(self.channels, frames, *size).clone()}
        if self.prompt is not None:
            item["prompt_embeds"] = self.prompt
        return item


def bound(source, **kw):
    dm = ClipDataModule(source, **kw).bind(REQS)
    dm.setup()
    return dm


def test_clips_are_whole_chunks_cut_at_seeded_offsets():
    dm = bound(Counting([20, 7, 2 + 3]), frames=6, seed=3)
    ds = dm.train_dataloader().dataset
    for index, length in ((0, 6), (1, 6), (2, 3)):  # 7 frames give 6; 5 give one chunk of 3
        sample = ds[(index, 0)]
        frames = sample["latents"][0, :, 0, 0]
        assert len(frames) == length
        start = int(frames[0]) - index * 1000
        assert torch.equal(frames, index * 1000 + torch.arange(start, start + length, dtype=torch.float32))
    offsets = {int(ds[(0, epoch)]["latents"][0, 0, 0, 0]) for epoch in range(8)}
    assert len(offsets) > 2 and all(0 <= o <= 14 for o in offsets)  # varies by epoch, stays inside
    assert torch.equal(ds[(0, 5)]["latents"], bound(Counting([20, 7, 5]), frames=6, seed=3)
                       .train_dataloader().dataset[(0, 5)]["latents"])  # deterministic


def test_collate_cuts_to_the_shortest_clip_and_pads_prompts():
    a = {"latents": torch.zeros(3, 6, 4, 4), "prompt_embeds": torch.ones(2, 8), "index": 0}
    b = {"latents": torch.ones(3, 3, 4, 4), "prompt_embeds": torch.ones(5, 8), "index": 1}
    batch = collate_clips([a, None, b])
    assert batch["latents"].shape == (2, 3, 3, 4, 4) and batch["skipped"] == 1
    assert batch["prompt_embeds"].shape == (2, 5, 8) and batch["prompt_embeds"][0, 2:].abs().sum() == 0
    assert collate_clips([None, None]) == {"skipped": 2}


def test_prompts_come_from_the_item_a_family_table_or_the_default():
    own = torch.randn(3, 8)
    dm = bound(Counting([6], prompt=own))
    assert torch.equal(dm.train_dataloader().dataset[(0, 0)]["prompt_embeds"], own)
    dm = bound(Counting([6]))
    default = dm.train_dataloader().dataset[(0, 0)]["prompt_embeds"]
    assert default.shape == (16, 8)
    assert torch.equal(dm.prompt_for({"prompt_id": 1}, "x"), dm.prompt_for({"prompt_id": 1}, "y"))
    assert not torch.allclose(dm.prompt_for({"prompt_id": 1}, "x"), dm.prompt_for({"prompt_id": 2}, "x"))
    with pytest.raises(DataError, match="clip0.safetensors: prompt_embeds .* text width 8"):
        bound(Counting([6], prompt=torch.randn(3, 5)))


def test_bad_samples_raise_naming_the_file_or_are_skipped_and_counted():
    with pytest.raises(DataError, match="clip1.safetensors has 2 frames, shorter than one chunk of 3"):
        bound(Counting([6, 2])).train_dataloader().dataset[(1, 0)]
    with pytest.raises(DataError, match="clip0.safetensors: 4 channels, but the backbone takes 3"):
        bound(Counting([6], channels=4))
    with pytest.raises(DataError, match="clip0.safetensors is not a readable"):
        bound(Counting([6], bad={0}))
    dm = bound(Counting([6, 2, 6, 6], bad={2}), batch_size=4, skip_bad_samples=True, shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch["skipped"] == 2 and batch["latents"].shape[0] == 2
    assert batch["index"].tolist() == [0, 3]


def test_rgb_into_a_latent_backbone_needs_a_vae():
    class Rgb(Counting):
        modality = "video"

    dm = ClipDataModule(Rgb([6])).bind(DataRequirements(channels=16, latent_size=(4, 4), text_dim=8,
                                                         chunk_frames=3))
    with pytest.raises(ConfigError, match="data.vae"):
        dm.setup()


def test_the_sampler_shards_ranks_and_resumes_mid_epoch():
    data = list(range(10))
    ranks = [list(ClipSampler(data, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in range(2)]
    assert sorted(i for rank in ranks for i, _ in rank) == data
    sampler = ClipSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.resume_at(4, 3)
    assert list(sampler) == full[3:] and list(sampler) == full  # skips once, in that epoch only


def module(seed=0):
    spec = BackboneSpec(size="tiny", overrides={"in_channels": 3, "out_channels": 3,
                                                "text_dim": 8})
    return MemoryFinetune(backbone=spec, memory=memkit.MemoryConfig(kind="hybrid_gdn", sink_frames=1,
                                                                    window_frames=3),
                          loss=TeacherForcing(), latent_size=(4, 4), lr=1e-2, seed=seed)


def run(steps, tmp_path, ckpt=None, every=None):
    """Train; returns the trained parameters and, per step, the batch's items and its loss."""
    callbacks = [] if every is None else [L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1, filename="{step}")]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=every is not None, callbacks=callbacks)
    m = module()
    steps_seen = []
    training_step, log_losses = m.training_step, m.log_losses

    def step(batch, batch_idx=0):
        steps_seen.append([batch["index"].tolist()])
        return training_step(batch, batch_idx)

    m.training_step = step
    m.log_losses = lambda stage, loss, per_chunk: (steps_seen[-1].append(loss.item()),
                                                   log_losses(stage, loss, per_chunk))
    dm = ClipDataModule(Counting([9, 12, 6, 15, 9, 12, 6, 9, 12, 15]), frames=6, batch_size=2, seed=1)
    trainer.fit(m, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}, steps_seen


def test_resuming_mid_epoch_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(tmp_path):
    straight, straight_steps = run(8, tmp_path)  # 5 batches an epoch: crosses into the second epoch
    _, first_steps = run(3, tmp_path, every=3)
    resumed, resumed_steps = run(8, tmp_path, ckpt=tmp_path / "step=3.ckpt")
    assert first_steps + resumed_steps == straight_steps  # the same batches, noise and losses, in order
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)


def write_video(path, frames, size=(8, 8)):
    from memkit.rollout.video import VideoWriter

    gen = torch.Generator().manual_seed(len(str(path)))
    with VideoWriter(path, fps=16) as writer:
        writer.write(torch.rand(1, 3, frames, *size, generator=gen) * 2 - 1)


def test_real_sources_bad_files_are_named(tmp_path):
    from safetensors.torch import save_file

    from memkit.data import LatentShards, VideoFolder

    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({"latents": torch.zeros(4, 6, 4, 4)}, str(shards / "four.safetensors"))
    with pytest.raises(DataError, match=r"four.safetensors: 4 channels, but the backbone takes 3"):
        bound(LatentShards(shards))
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a_long.mp4", 8)
    write_video(videos / "b_short.mp4", 2)
    (videos / "c_broken.mp4").write_bytes(b"not a video at all")
    with pytest.raises(DataError, match=r"^2 of 3 samples of data.source cannot be used: \S+b_short.mp4 has 2 frames, "
                                        r"shorter than one chunk of 3 .*; \S+c_broken.mp4 is not a readable video.*"
                                        r"set data.skip_bad_samples: true"):
        bound(VideoFolder(videos))  # every bad file named before training, not one per run
    dm = bound(VideoFolder(videos), batch_size=3, skip_bad_samples=True, shuffle=False)
    ds = dm.train_dataloader().dataset
    assert ds[(0, 0)]["latents"].shape == (3, 6, 4, 4)
    assert ds[(1, 0)] is None and ds[(2, 0)] is None  # skipped, and logged
    with pytest.raises(DataError, match=r"b_short.mp4 has 2 frames, shorter than one chunk of 3"):
        ds._load(1, 0)
    with pytest.raises(DataError, match=r"c_broken.mp4"):
        ds._load(2, 0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["skipped"] == 2 and batch["latents"].shape[0] == 1


def test_rgb_clips_are_encoded_on_the_device_by_the_vae(tmp_path):
    from memkit.data import ProceduralVideos
    from memkit.rollout.vae import normalize_latents, tiny_wan_vae

    vae = tiny_wan_vae(z_dim=16)
    vae.save_pretrained(tmp_path / "vae")
    reqs = DataRequirements(channels=16, latent_size=(4, 4), text_dim=8, chunk_frames=3)
    source = ProceduralVideos(count=2, frames=40, seed=5)
    dm = ClipDataModule(source, frames=6, vae=str(tmp_path / "vae"), shuffle=False).bind(reqs)
    dm.setup()
    assert dm.source_size == (32, 32) and dm.source_frames_of(6) == 21
    raw = next(iter(dm.train_dataloader()))
    video = raw["video"]
    assert video.shape == (1, 3, 21, 32, 32)
    batch = dm.on_after_batch_transfer(dict(raw), 0)
    with torch.no_grad():
        expected = normalize_latents(vae.encode(video).latent_dist.mode(), vae.config)
    assert "video" not in batch and batch["latents"].shape == (1, 16, 6, 4, 4)
    assert torch.allclose(batch["latents"], expected, atol=1e-6)
