"""``LoopVideos``: places visited in a loop, their prompts, and which frames return to a place that left a local
memory (checked against labels worked out by hand)."""

import pickle

import pytest
import torch

from memkit.data import ClipDataModule, LoopVideos, loop_labels, place_embeddings
from memkit.data.datamodule import ClipDataset, DataRequirements
from memkit.errors import ConfigError, DataError

SIZE = (8, 8)


def test_same_seed_same_frames_other_seed_or_item_other_frames():
    a, b = LoopVideos(count=3, frames=18, seed=1), LoopVideos(count=3, frames=18, seed=1)
    assert torch.equal(a.read(2, 0, 18, SIZE)["video"], b.read(2, 0, 18, SIZE)["video"])
    assert not torch.equal(a.read(2, 0, 18, SIZE)["video"], LoopVideos(count=3, frames=18, seed=2).read(
        2, 0, 18, SIZE)["video"])
    assert not torch.equal(a.read(0, 0, 18, SIZE)["video"], a.read(1, 0, 18, SIZE)["video"])
    again = pickle.loads(pickle.dumps(a))
    assert torch.equal(again.read(1, 3, 9, SIZE)["video"], a.read(1, 3, 9, SIZE)["video"])


@pytest.mark.parametrize("loop_places, shot_frames", [(3, 3), (2, 1), (4, 2)])
def test_a_start_place_then_the_loop_in_order_each_shot_static_and_a_place_the_same_at_every_visit(
        loop_places, shot_frames):
    source = LoopVideos(count=2, frames=shot_frames * (1 + 3 * loop_places), seed=0, loop_places=loop_places,
                        shot_frames=shot_frames, places=9)
    for index in range(2):
        item = source.read(index, 0, source.frames, SIZE)
        video, ids = item["video"], item["actions"]
        assert video.shape == (3, source.frames, *SIZE) and ids.dtype == torch.long
        assert torch.equal(ids, source.actions(index))
        shots = ids[::shot_frames].tolist()
        start, loop = shots[0], shots[1: 1 + loop_places]
        assert len(set(loop)) == loop_places and start not in loop and max(shots) < 9
        assert shots == [start] + [loop[s % loop_places] for s in range(len(shots) - 1)]
        for t in range(source.frames):
            assert int(ids[t]) == shots[t // shot_frames]
            first = int((ids == ids[t]).nonzero()[0])
            assert torch.equal(video[:, t], video[:, first])  # the place looks as it did
        assert video.abs().max() <= 0.8 and (video.amax(dim=(2, 3)) == video.amin(dim=(2, 3))).all()  # flat
        colours = {int(ids[t]): video[:, t, 0, 0] for t in range(source.frames)}
        assert len({tuple(c.tolist()) for c in colours.values()}) == len(colours)  # places look different


def test_a_window_equals_the_same_frames_cut_from_a_longer_read_and_mosaics_have_cells():
    source = LoopVideos(count=1, frames=30, seed=3, mosaic=2)
    whole = source.read(0, 0, 30, SIZE)
    part = source.read(0, 6, 9, SIZE)
    assert torch.equal(part["video"], whole["video"][:, 6:15]) and torch.equal(part["actions"], whole["actions"][6:15])
    frame = whole["video"][:, 0]
    quads = [frame[:, :4, :4], frame[:, :4, 4:], frame[:, 4:, :4], frame[:, 4:, 4:]]
    assert all((q == q[:, :1, :1]).all() for q in quads)  # each cell one colour
    assert len({tuple(q[:, 0, 0].tolist()) for q in quads}) == 4


def test_labels_against_a_path_worked_out_by_hand():
    # shots of 3 frames: S A B C A B; local memory: sink 3 + window 3 frames, chunks of 3
    places = torch.tensor([9, 1, 2, 3, 1, 2]).repeat_interleave(3)
    labels = loop_labels(places, window=3, sink=3, chunk=3)
    shot = {name: labels[name][::3].tolist() for name in ("revisit", "new", "seen_before")}
    assert shot["new"] == [True, True, True, True, False, False]
    assert shot["revisit"] == [False, False, False, False, True, True]
    assert labels["last_seen"].tolist() == [-1] * 12 + [5] * 3 + [8] * 3  # A's last frame 5, B's 8
    # a window of 2 shots holds B, C at shot 4 and C, A at shot 5: both returns left it
    wide = loop_labels(places, window=6, sink=3, chunk=3)
    assert wide["revisit"][::3].tolist() == [False, False, False, False, True, True]
    wider = loop_labels(places, window=9, sink=3, chunk=3)  # 3 shots: A, B, C at shot 4; B, C, A at shot 5
    assert wider["revisit"][::3].tolist() == [False] * 6 and wider["seen_before"][12:].all()
    in_sink = loop_labels(torch.tensor([5, 1, 5, 1]).repeat_interleave(3), window=3, sink=3, chunk=3)
    assert in_sink["revisit"][::3].tolist() == [False, False, False, True]  # the sink holds place 5, not 1
    every = loop_labels(places, chunk=3)  # no local memory bound: everything before is held
    assert not every["revisit"].any() and torch.equal(every["new"], labels["new"])


def test_frames_of_one_chunk_read_the_frames_before_the_chunk_not_each_other():
    places = torch.tensor([0, 1, 2, 0, 0, 0])  # frames 3-5: one chunk of 3 showing place 0 again
    labels = loop_labels(places, window=1, sink=0, chunk=3)
    assert labels["revisit"][3:].tolist() == [True, True, True]  # within the chunk, frame 3 is not "held"
    assert loop_labels(places, window=1, sink=0, chunk=1)["revisit"][3:].tolist() == [True, False, False]


def test_each_chunk_of_a_clip_gets_its_place_prompt():
    source = LoopVideos(count=4, frames=24, seed=7)
    dm = ClipDataModule(source, frames=12, batch_size=2, prompt_len=4, seed=0)
    dm.requirements = DataRequirements(channels=3, latent_size=SIZE, text_dim=16, chunk_frames=3)
    table = place_embeddings(16, 4, source.places)
    assert table.shape == (16, 4, 16) and torch.equal(table[3, 0], table[3, 3])
    assert torch.equal(table, place_embeddings(16, 4, 16)) and not torch.equal(table[0], table[1])
    dataset = ClipDataset(source, dm, random_crop=True)
    for index in range(4):
        sample = dataset[(index, 1)]
        whole = source.read(index, 0, 24, SIZE)["video"]
        video = sample["video"] if "video" in sample else sample["latents"]
        start = next(s for s in range(0, 13) if torch.equal(whole[:, s: s + 12], video))
        assert start % 3 == 0
        ids = source.actions(index)[start: start + 12: 3]
        assert torch.equal(sample["prompt_embeds"], table[ids])


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ConfigError, match="places .* at least loop_places"):
        LoopVideos(places=3, loop_places=3)
    with pytest.raises(ConfigError, match="mosaic"):
        LoopVideos(mosaic=3).read(0, 0, 3, SIZE)
    with pytest.raises(DataError, match=r"frames \[20, 30\)"):
        LoopVideos(frames=24).read(0, 20, 10, SIZE)
    with pytest.raises(ConfigError, match="loop_places"):
        LoopVideos(loop_places=0)
    with pytest.raises(ConfigError, match="window"):
        loop_labels(torch.zeros(3, dtype=torch.long), window=-1)
    with pytest.raises(IndexError):
        LoopVideos(count=2).actions(2)
