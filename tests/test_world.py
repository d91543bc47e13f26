"""``WorldVideos``: a static world seen through a moving camera, and the revisit labels of its path."""

import pickle

import pytest
import torch

from memkit.data.world import ACTIONS, WorldVideos, revisit_labels
from memkit.errors import ConfigError, DataError

STEP = {"stay": (0, 0), "left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def frames_of(source: WorldVideos, index: int = 0, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    return source.read(index, 0, source.frames, size)["video"]


def first_frame_after(source: WorldVideos, action: str, index: int = 0) -> int:
    actions = source.actions(index).tolist()
    return next(t for t in range(1, len(actions)) if ACTIONS[actions[t]] == action)


# ----------------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_frames_other_seed_other_frames():
    first, second = WorldVideos(count=2, frames=30, seed=3), WorldVideos(count=2, frames=30, seed=3)
    clip = first.read(1, 0, 30, (32, 48))
    assert clip["video"].shape == (3, 30, 32, 48) and clip["video"].dtype == torch.float32
    assert clip["video"].min() >= -1 and clip["video"].max() <= 1
    assert torch.equal(clip["video"], second.read(1, 0, 30, (32, 48))["video"])
    assert torch.equal(clip["actions"], second.actions(1)[:30]) and clip["actions"].dtype == torch.long
    other = WorldVideos(count=2, frames=30, seed=4).read(1, 0, 30, (32, 48))["video"]
    assert (other - clip["video"]).abs().mean() > 0.05
    assert (first.read(0, 0, 30, (32, 48))["video"] - clip["video"]).abs().mean() > 0.05  # items differ too


def test_a_window_equals_the_same_frames_cut_from_a_longer_read():
    source = WorldVideos(count=1, frames=30, seed=1)
    whole = source.read(0, 0, 30, (40, 56))
    part = WorldVideos(count=1, frames=30, seed=1).read(0, 10, 10, (40, 56))  # a fresh object: no shared cache
    assert torch.equal(part["video"], whole["video"][:, 10:20])
    assert torch.equal(part["actions"], whole["actions"][10:20])


def test_reads_at_other_sizes_and_items_do_not_mix_up():
    source = WorldVideos(count=6, frames=12, seed=0)
    fresh = {(index, size): WorldVideos(count=6, frames=12, seed=0).read(index, 0, 12, size)["video"]
             for index in (0, 5) for size in ((32, 32), (32, 48), (48, 32))}
    for _ in range(2):  # the second round finds some worlds cached and others pushed out of the cache
        for (index, size), video in fresh.items():
            assert torch.equal(source.read(index, 0, 12, size)["video"], video)


def test_a_pickled_source_gives_the_same_frames():
    source = WorldVideos(count=2, frames=24, seed=5)
    reference = source.read(1, 0, 24, (32, 32))["video"]  # fills the cache before pickling
    copy = pickle.loads(pickle.dumps(source))
    assert torch.equal(copy.read(1, 0, 24, (32, 32))["video"], reference)


def test_frames_do_not_depend_on_thread_count():
    threads = torch.get_num_threads()
    reference = frames_of(WorldVideos(count=1, frames=12, seed=2), size=(48, 48))
    try:
        torch.set_num_threads(1)
        assert torch.equal(frames_of(WorldVideos(count=1, frames=12, seed=2), size=(48, 48)), reference)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- camera and path


def test_the_same_position_renders_the_same_frame_and_other_positions_differ():
    source = WorldVideos(count=1, frames=120, seed=0)
    video, positions = frames_of(source), source.positions(0).tolist()
    pairs = [(s, t) for t in range(len(positions)) for s in range(t) if positions[s] == positions[t]]
    assert len(pairs) > 10
    for s, t in pairs:
        assert torch.equal(video[:, s], video[:, t])
    different = [(s, t) for t in range(0, 120, 7) for s in range(t) if positions[s] != positions[t]]
    assert different and all((video[:, s] - video[:, t]).abs().amax() > 0.1 for s, t in different)


@pytest.mark.parametrize("size", [(32, 32), (40, 24)])  # cells of 4x4 and of 5x3 pixels
def test_moving_right_or_down_shifts_the_view_by_one_cell(size):
    source = WorldVideos(count=1, frames=240, seed=0, view_cells=8)
    video = frames_of(source, size=size)
    cell_height, cell_width = size[0] // 8, size[1] // 8
    t = first_frame_after(source, "right")
    assert torch.equal(video[:, t, :, :-cell_width], video[:, t - 1, :, cell_width:])
    assert not torch.equal(video[:, t], video[:, t - 1])
    t = first_frame_after(source, "down")
    assert torch.equal(video[:, t, :-cell_height, :], video[:, t - 1, cell_height:, :])
    t = first_frame_after(source, "left")
    assert torch.equal(video[:, t, :, cell_width:], video[:, t - 1, :, :-cell_width])
    t = first_frame_after(source, "stay")
    assert torch.equal(video[:, t], video[:, t - 1])


def test_positions_follow_the_actions_and_actions_hold_for_a_segment():
    source = WorldVideos(count=3, frames=100, seed=7, world_cells=20, action_frames=4)
    for index in range(3):
        actions, positions = source.actions(index).tolist(), source.positions(index).tolist()
        assert len(actions) == len(positions) == 100 and source.crop_step == 4
        assert all(0 <= p < 20 for position in positions for p in position)
        for segment in range(0, 100, 4):
            assert len(set(actions[segment:segment + 4])) == 1
        for t in range(1, 100):
            step = STEP[ACTIONS[actions[t]]]
            assert positions[t] == [(positions[t - 1][0] + step[0]) % 20, (positions[t - 1][1] + step[1]) % 20]
        assert {ACTIONS[a] for a in actions} > {"stay"}  # the camera does move


def test_the_camera_wraps_round_the_world_edge():
    source = WorldVideos(count=1, frames=240, seed=0, view_cells=2, world_cells=4)
    video, positions = frames_of(source, size=(8, 8)), source.positions(0).tolist()
    actions = source.actions(0).tolist()
    crossings = [t for t in range(1, 240) if positions[t - 1][1] == 3 and ACTIONS[actions[t]] == "right"]
    assert crossings
    for t in crossings:
        assert positions[t] == [positions[t - 1][0], 0]
        assert torch.equal(video[:, t, :, :4], video[:, t - 1, :, 4:])  # the view slid across the edge
    t = next(t for t in crossings if positions[t] in positions[:t])
    last = max(s for s in range(t) if positions[s] == positions[t])
    assert torch.equal(video[:, last], video[:, t])
    labels = source.labels(0)
    assert labels["seen_before"][t] and labels["frames_since"][t] == t - last


# -------------------------------------------------------------------------------------------------- revisit labels


def test_labels_of_a_path_out_and_back():
    positions = torch.tensor([(0, 0), (0, 1), (0, 2), (0, 1), (0, 0)])
    labels = revisit_labels(positions, view_cells=2, world_cells=6)
    assert set(labels) == {"seen_before", "frames_since", "novel_fraction"}
    assert labels["seen_before"].tolist() == [False, False, False, True, True]
    assert labels["frames_since"].tolist() == [-1, -1, -1, 2, 4]
    # Each step right brings one new column of 2 cells into a view of 4.
    assert labels["novel_fraction"].tolist() == [1.0, 0.5, 0.5, 0.0, 0.0]


def test_labels_count_novel_cells_in_two_dimensions():
    labels = revisit_labels(torch.tensor([(0, 0), (1, 1), (1, 0)]), view_cells=2, world_cells=6)
    # (1, 1) shares only cell (1, 1) with the first view; (1, 0) adds row 2's cell (2, 0).
    assert labels["novel_fraction"].tolist() == [1.0, 0.75, 0.25]
    assert labels["seen_before"].tolist() == [False, False, False]


def test_labels_wrap_round_the_world_edge():
    # Columns of the views: {3, 0}, {0, 1}, {1, 2}, {0, 1}, {3, 0}; (0, 4) is (0, 0) again.
    positions = torch.tensor([(0, 3), (0, 4), (0, 1), (0, 0), (4, -1)])
    labels = revisit_labels(positions, view_cells=2, world_cells=4)
    assert labels["seen_before"].tolist() == [False, False, False, True, True]
    assert labels["frames_since"].tolist() == [-1, -1, -1, 2, 4]
    assert labels["novel_fraction"].tolist() == [1.0, 0.5, 0.5, 0.0, 0.0]


def test_content_that_left_the_local_memory_is_recalled_and_keeps_that_origin_while_copied():
    # view_cells 2: the views' columns are {0,1}, {2,3}, {4,5}, {0,1}, {0,1}, {1,2}, {0,1} (rows always {0,1}).
    positions = torch.tensor([(0, 0), (0, 2), (0, 4), (0, 0), (0, 0), (0, 1), (0, 0)])
    labels = revisit_labels(positions, view_cells=2, world_cells=6, window=1)
    assert labels["seen_before"].tolist() == [False, False, False, True, True, False, True]
    assert labels["frames_since"].tolist() == [-1, -1, -1, 3, 1, -1, 2]
    assert labels["novel_fraction"].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    # Window of 1 frame: frame 3 brings back columns 0-1 from long ago; frame 4 copies them (still recalled);
    # frame 5 keeps column 1 and brings back column 2 (seen at frame 1); frame 6 brings back column 0.
    assert labels["recalled_fraction"].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert labels["new_fraction"].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert labels["revisit"].tolist() == [False, False, False, True, True, True, True]
    assert labels["new"].tolist() == [True, True, True, False, False, False, False]

    wider = revisit_labels(positions, view_cells=2, world_cells=6, window=3)
    # Three frames back reach frame 0's view at frame 3; only column 2 (seen at frame 1) is out of reach by frame 5.
    assert wider["recalled_fraction"].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0]
    assert wider["new_fraction"].tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0]

    with_sink = revisit_labels(positions, view_cells=2, world_cells=6, window=1, sink=1)
    # Frame 0's view (columns 0-1) is held forever: only column 2, back at frame 5, is recalled.
    assert with_sink["recalled_fraction"].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0]
    assert with_sink["revisit"].tolist() == [False] * 5 + [True, False]


def test_frames_of_one_chunk_read_the_window_before_the_chunk_not_each_other():
    positions = torch.tensor([(0, 0), (0, 2), (0, 4), (0, 0), (0, 0), (0, 1), (0, 0)])  # as above
    per_frame = revisit_labels(positions, view_cells=2, world_cells=6, window=2)
    # Frame by frame, frame 3's window is frames 1-2: columns 0-1 are recalled, and stay so while copied.
    assert per_frame["recalled_fraction"].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    chunked = revisit_labels(positions, view_cells=2, world_cells=6, window=2, chunk=2)
    # In chunks of 2, frame 3 (chunk 2-3) reads frames 0-1, which hold columns 0-1: still in reach, still new.
    # Frame 5 (chunk 4-5) reads frames 2-3 (columns 4-5, 0-1): column 2, seen at frame 1, is recalled.
    assert chunked["recalled_fraction"].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0]
    assert chunked["new_fraction"].tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0]
    assert torch.equal(revisit_labels(positions, 2, 6, window=2, chunk=1)["recalled_fraction"],
                       per_frame["recalled_fraction"])


def test_the_default_path_revisits_old_places_and_finds_new_ones():
    for seed in range(3):
        labels = WorldVideos(count=1, frames=240, seed=seed).labels(0, window=6, sink=3)
        assert all(tensor.shape == (240,) for tensor in labels.values())
        long_ago = labels["seen_before"] & (labels["frames_since"] > 12)
        assert 0.25 <= long_ago.float().mean() <= 0.6
        assert labels["revisit"].float().mean() >= 0.1 and labels["new"].float().mean() >= 0.1
        assert (labels["novel_fraction"][1:] > 0).float().mean() >= 0.1
        assert labels["novel_fraction"][0] == 1.0


# ---------------------------------------------------------------------------------------------------- bad arguments


def test_bad_arguments_raise_clear_errors():
    source = WorldVideos(count=2, frames=30)
    with pytest.raises(ConfigError, match=r"30x32.*view_cells \(8\)"):
        source.read(0, 0, 4, (30, 32))
    with pytest.raises(ConfigError, match="world_cells"):
        WorldVideos(view_cells=8, world_cells=6)
    with pytest.raises(ConfigError, match="action_frames"):
        WorldVideos(action_frames=0)
    with pytest.raises(DataError, match=r"world video #1.*\[25, 35\).*30 frames"):
        source.read(1, 25, 10, (32, 32))
    with pytest.raises(DataError):
        source.read(1, -1, 4, (32, 32))
    with pytest.raises(ConfigError, match="size"):
        source.read(0, 0, 4, (32,))
    with pytest.raises(IndexError):
        source.positions(2)
    with pytest.raises(ConfigError, match="window"):
        revisit_labels(torch.zeros(3, 2, dtype=torch.long), 2, 6, window=-1)
    with pytest.raises(ValueError, match="positions"):
        revisit_labels(torch.zeros(3, 3, dtype=torch.long), 2, 6)
