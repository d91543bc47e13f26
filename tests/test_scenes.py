"""``SceneVideos``: scenes of shapes cut back to after a varying lag, their prompts (the lag alone), and which frames
return to a scene that left a local memory (checked against the frames' pixels, not the source's own plan)."""

import pickle

import pytest
import torch

from memkit.data import ClipDataModule, SceneVideos, place_embeddings
from memkit.data.datamodule import ClipDataset, DataRequirements
from memkit.errors import ConfigError, DataError

SIZE = (16, 16)


def test_same_seed_same_frames_other_seed_or_item_other_frames():
    a, b = SceneVideos(count=3, frames=24, seed=1), SceneVideos(count=3, frames=24, seed=1)
    assert torch.equal(a.read(2, 0, 24, SIZE)["video"], b.read(2, 0, 24, SIZE)["video"])
    assert not torch.equal(a.read(2, 0, 24, SIZE)["video"],
                           SceneVideos(count=3, frames=24, seed=2).read(2, 0, 24, SIZE)["video"])
    assert not torch.equal(a.read(0, 0, 24, SIZE)["video"], a.read(1, 0, 24, SIZE)["video"])
    again = pickle.loads(pickle.dumps(a))
    assert torch.equal(again.read(1, 3, 9, SIZE)["video"], a.read(1, 3, 9, SIZE)["video"])


@pytest.mark.parametrize("min_lag, max_lag, shot_frames", [(2, 4, 3), (1, 1, 2), (3, 5, 1)])
def test_a_return_shows_the_frames_of_the_shot_its_prompt_names_and_a_new_scene_any_earlier_one(
        min_lag, max_lag, shot_frames):
    source = SceneVideos(count=12, frames=shot_frames * 12, seed=0, shot_frames=shot_frames, min_lag=min_lag,
                         max_lag=max_lag)
    lags = []
    for index in range(len(source)):
        item = source.read(index, 0, source.frames, SIZE)
        video, prompts = item["video"], item["actions"]
        assert torch.equal(prompts, source.actions(index)) and prompts.dtype == torch.long
        shots = [video[:, s * shot_frames: (s + 1) * shot_frames] for s in range(12)]
        for s, shot in enumerate(shots):
            assert (shot == shot[:, :1]).all()  # a static shot
            lag = int(prompts[s * shot_frames])
            assert (prompts[s * shot_frames: (s + 1) * shot_frames] == lag).all()
            if lag:
                lags.append(lag)
                assert min_lag <= lag <= max_lag and s - lag >= 1  # the first shot (a sink's) never comes back
                assert torch.equal(shot, shots[s - lag])
            else:
                assert all(not torch.equal(shot[:, 0], earlier[:, 0]) for earlier in shots[:s])
        frame = video[:, 0]
        assert len(torch.unique(frame.flatten(1), dim=1).T) > 8  # textured, with shapes: not a flat colour
    assert set(lags) == set(range(min_lag, max_lag + 1))  # the lag of a return varies
    assert 0.2 < len(lags) / (len(source) * 12) < 0.7


def test_no_returns_before_a_lag_reaches_past_the_first_shot_and_none_at_rate_zero():
    source = SceneVideos(count=20, frames=30, seed=4, min_lag=2, max_lag=4)
    assert all(source.plan(i)[1][:3] == [0, 0, 0] for i in range(20))
    never = SceneVideos(count=5, frames=30, seed=4, return_rate=0.0)
    assert all(never.plan(i)[0] == list(range(10)) for i in range(5))


def test_labels_mark_the_frames_whose_scene_left_a_local_memory_as_the_pixels_say():
    source = SceneVideos(count=16, frames=36, seed=3)
    marked = 0
    for index in range(len(source)):
        video = source.read(index, 0, 36, SIZE)["video"]
        labels = source.labels(index, window=3, sink=3, chunk=3)
        for t in range(36):
            start = t - t % 3
            same = [s for s in range(start) if torch.equal(video[:, s], video[:, t])]
            held = [s for s in same if s < 3 or s >= start - 3]
            assert bool(labels["revisit"][t]) == (bool(same) and not held), (index, t)
            assert bool(labels["new"][t]) == (not same)
            assert int(labels["last_seen"][t]) == max(same, default=-1)
        marked += int(labels["revisit"].sum())
    assert marked >= 16 * 3  # about one return per video at least


def test_a_window_equals_the_same_frames_cut_from_a_longer_read():
    source = SceneVideos(count=2, frames=30, seed=5)
    whole = source.read(1, 0, 30, SIZE)
    part = source.read(1, 6, 12, SIZE)
    assert torch.equal(part["video"], whole["video"][:, 6:18])
    assert torch.equal(part["actions"], whole["actions"][6:18])


def test_each_chunk_of_a_clip_gets_its_lag_prompt():
    source = SceneVideos(count=4, frames=24, seed=7)
    dm = ClipDataModule(source, frames=24, batch_size=2, prompt_len=4, seed=0)
    dm.requirements = DataRequirements(channels=3, latent_size=SIZE, text_dim=16, chunk_frames=3)
    table = source.prompt_table(16, 4)
    assert table.shape == (5, 4, 16) and torch.equal(table, place_embeddings(16, 4, 5))
    dataset = ClipDataset(source, dm, random_crop=False)
    for index in range(4):
        sample = dataset[(index, 0)]
        assert torch.equal(sample["prompt_embeds"], table[source.actions(index)[::3]])


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ConfigError, match="max_lag .* at least min_lag"):
        SceneVideos(min_lag=4, max_lag=2)
    with pytest.raises(ConfigError, match="return_rate"):
        SceneVideos(return_rate=1.5)
    with pytest.raises(ConfigError, match="shapes"):
        SceneVideos(shapes=0)
    with pytest.raises(DataError, match=r"frames \[20, 30\)"):
        SceneVideos(frames=24).read(0, 20, 10, SIZE)
    with pytest.raises(IndexError):
        SceneVideos(count=2).plan(2)
