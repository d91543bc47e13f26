"""The world benchmark end to end: action-conditioned training data, per-chunk prompts, the world model file,
``memkit bench quality`` on a tiny budget, and the models shipped for the demo."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from test_train import MEMORY, fixed_batch, module_for

from memkit.bench.quality import VARIANTS, QualitySetup, quick_setup
from memkit.cli import main
from memkit.data import ClipDataModule, WorldVideos, action_embeddings
from memkit.data.datamodule import DataRequirements, collate_clips
from memkit.demo import SCENE_MODELS, WORLD_MODELS, asset, load_shipped
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
    model = WorldModel(setup.backbone(), setup.memory("hybrid_blockwise"), (16, 16), prompt_len=setup.prompt_len,
                       prompts=setup.prompts)
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
    assert again.prompts == model.prompts == f"places:{setup.places}"
    bad = world.actions(0).clone()
    bad[5] = setup.places
    with pytest.raises(ConfigError, match=r"prompt ids in \[0, 16\) \(places:16\)"):
        model.rollout(truth[:, :3], bad, 12)
    with pytest.raises(ConfigError, match="prompts must be 'actions' or 'places:N'"):
        WorldModel(setup.backbone(), setup.memory("sink_window"), (16, 16), prompts="places:0")
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
        assert set(r["psnr_tf_colour"]) == {"revisit", "new", "all"}
        assert set(r["psnr_self_colour"]) == {"revisit", "new"}
    header, rule, *rows = [line for line in table.splitlines() if line.startswith("|")]
    assert all(line.count("|") == header.count("|") for line in [rule, *rows])  # every row fills every column
    assert report["results"]["full"]["state_bytes"] > report["results"]["sink_window"]["state_bytes"]
    assert (out / "quality.png").stat().st_size > 10_000 and (out / "quality_strip.png").stat().st_size > 10_000
    assert WorldModel.load(models / "world_hybrid_gdn.safetensors").memory.kind == "hybrid_gdn"
    before = (out / "quality.md").read_bytes()
    assert main(["bench", "quality", "--quick", "--out", str(out)]) == 2  # never replaces a report by default
    assert "quality.md exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "quality.md").read_bytes() == before
    # the exported models evaluated again, training nothing: the same numbers
    again = tmp_path / "again"
    assert main(["bench", "quality", "--from-models", str(models), "--out", str(again)]) == 0
    second = json.loads((again / "quality.json").read_text())
    assert second["setup"] == report["setup"]
    for kind, r in report["results"].items():
        for key in ("psnr", "psnr_tf", "psnr_self", "psnr_tf_colour", "psnr_self_colour", "final_loss"):
            assert json.dumps(second["results"][kind][key]) == json.dumps(r[key]), (kind, key)  # NaN too
        assert second["results"][kind]["train_seconds"] == round(r["train_seconds"], 1)  # as the file keeps it
    assert main(["bench", "quality", "--from-models", str(models), "--steps", "5", "--out", str(again)]) == 2
    assert "--from-models evaluates trained models with their own setup; drop --steps" in capsys.readouterr().err


@pytest.mark.parametrize("name, file, world", [*((n, f, "loops") for n, f in WORLD_MODELS.items()),
                                               *((n, f, "scenes") for n, f in SCENE_MODELS.items())])
def test_the_shipped_world_models_load_and_fail_cleanly_when_truncated(name, file, world, tmp_path):
    path = asset(file)
    model = WorldModel.load(str(path))
    setup = QualitySetup.from_record(model.meta["training"]["setup"])
    assert model.memory == setup.memory(name) and path.stat().st_size < 10 * 2**20
    assert setup.world_kind == world
    cut = tmp_path / "cut.safetensors"
    shutil.copyfile(path, cut)
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size - 1000)
    with pytest.raises(StateFormatError, match="truncated or corrupt"):
        WorldModel.load(cut)


#: The shipped models on 2 held-out worlds from the true past, hybrid_gdn minus sink_window, measured: on returns
#: to a place that left the local memory +3.74 dB at seed 30000 (13.40 vs 9.66; +3.62 and +4.09 at seeds 31000
#: and 32000), on new places +0.24 dB (9.41 vs 9.17; +0.23 and +1.03). The test asks for recall with a margin
#: and no more than noise on new places.
REVISIT_DB, NEW_DB = 2.5, 1.0
#: The same frames as mean colours (the place without the sampled texture): returns +8.61 dB at seed 30000 (20.99 vs
#: 12.38; +13.25, +11.46, +13.26 at seeds 31000-33000), new places +0.34 (+0.31, +2.25, +1.90).
REVISIT_COLOUR_DB, NEW_COLOUR_DB = 6.0, 3.0


def test_the_shipped_hybrid_shows_a_place_that_left_its_local_memory_as_it_was_and_sink_window_does_not():
    from memkit.bench.quality import frame_means, frame_psnr

    models, setup = load_shipped(WORLD_MODELS)
    F, frames = setup.chunk_frames, setup.eval_frames
    worlds = setup.world(2, frames, 30_000)
    scores = {name: {"revisit": [], "new": [], "revisit colour": [], "new colour": []} for name in models}
    for i in range(2):
        truth = worlds.read(i, 0, frames, (setup.frame_size, setup.frame_size))["video"]
        labels = worlds.labels(i, window=setup.window_frames, sink=setup.sink_frames, chunk=F)
        assert labels["revisit"].sum() >= 3 * F and labels["new"][F:].sum() >= 2 * F
        for name, model in models.items():
            video = model.rollout(truth[:, :F], worlds.actions(i), frames, seed=i, history=truth).video
            for level, psnr in (("", frame_psnr(video, truth)),
                                (" colour", frame_psnr(frame_means(video), frame_means(truth)))):
                scores[name]["revisit" + level].append(psnr[labels["revisit"]])
                scores[name]["new" + level].append(psnr[F:][labels["new"][F:]])
    mean = {name: {k: float(torch.cat(v).mean()) for k, v in s.items()} for name, s in scores.items()}
    hybrid, local = mean["hybrid_gdn"], mean["sink_window"]
    assert hybrid["revisit"] > local["revisit"] + REVISIT_DB, mean  # recall
    assert hybrid["new"] < local["new"] + NEW_DB, mean  # not a better model: new places are no better
    assert hybrid["revisit colour"] > local["revisit colour"] + REVISIT_COLOUR_DB, mean
    assert hybrid["new colour"] < local["new colour"] + NEW_COLOUR_DB, mean


#: The shipped scene models on 2 held-out videos from the true past (36 frames), hybrid_layout minus sink_window,
#: measured: on returns to a scene that left the local memory +9.99 dB at seed 30000 (22.97 vs 12.98; +10.91 and
#: +12.27 at seeds 31000 and 32000), on new scenes +0.24 dB (11.67 vs 11.43; -0.28 and +0.02). The test asks for
#: a layout brought back with a margin (a colour alone gives at most +3.5 dB: the true frames' mean colours score
#: 15.0 dB on returns against sink_window's 11.6) and no more than noise on new scenes.
SCENE_REVISIT_DB, SCENE_NEW_DB = 6.0, 1.0


def test_the_shipped_layout_hybrid_brings_a_scene_back_and_sink_window_does_not():
    from memkit.bench.quality import frame_psnr

    models, setup = load_shipped(SCENE_MODELS)
    F, frames = setup.chunk_frames, setup.eval_frames
    videos = setup.world(2, frames, 30_000)
    scores = {name: {"revisit": [], "new": []} for name in models}
    for i in range(2):
        truth = videos.read(i, 0, frames, (setup.frame_size, setup.frame_size))["video"]
        labels = videos.labels(i, window=setup.window_frames, sink=setup.sink_frames, chunk=F)
        assert labels["revisit"].sum() >= 2 * F and labels["new"][F:].sum() >= 2 * F
        for name, model in models.items():
            psnr = frame_psnr(model.rollout(truth[:, :F], videos.actions(i), frames, seed=i, history=truth).video,
                              truth)
            scores[name]["revisit"].append(psnr[labels["revisit"]])
            scores[name]["new"].append(psnr[F:][labels["new"][F:]])
    mean = {name: {k: float(torch.cat(v).mean()) for k, v in s.items()} for name, s in scores.items()}
    hybrid, local = mean["hybrid_layout"], mean["sink_window"]
    assert hybrid["revisit"] > local["revisit"] + SCENE_REVISIT_DB, mean  # the layout comes back
    assert hybrid["new"] < local["new"] + SCENE_NEW_DB, mean  # not a better model: new scenes are no better


@pytest.mark.parametrize("flags, message", [
    (["--clip-frames", "6"], "never learns"),  # the quick setup's global memory is first read by frame 6
    (["--variants", "full", "full"], "lists a variant twice"),
    (["--eval-frames", "2001"], "RoPE table"),
    (["--clip-frames", "243"], "at most the training videos"),
])
def test_quality_bench_refuses_a_setup_that_cannot_work_before_training(flags, message, tmp_path, capsys):
    assert main(["bench", "quality", "--quick", "--out", str(tmp_path / "r"), *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_gap_closed_and_its_spread_over_worlds_against_hand_computed_values():
    from memkit.bench.quality import VariantResult, gap_closed, gap_spread

    def result(kind, revisit):
        r = VariantResult(kind)
        r.psnr_tf = {"revisit": sum(revisit) / len(revisit), "new": 10.0, "all": 10.0}
        r.psnr_tf_worlds = {"revisit": revisit, "new": [10.0] * len(revisit)}
        return r

    results = {"full": result("full", [14.0, 16.0, 15.0, 15.0]),
               "sink_window": result("sink_window", [10.0, 10.0, 10.0, 10.0]),
               "hybrid_gdn": result("hybrid_gdn", [14.0, 16.0, 15.0, 15.0]),  # as full in every world
               "hybrid_ssd": result("hybrid_ssd", [10.0, 10.0, 10.0, 10.0]),  # as sink_window
               "hybrid_blockwise": result("hybrid_blockwise", [12.0, 13.0, 12.5, 12.5])}  # half the gap
    gaps = gap_closed(results, forced=True)
    assert gaps == pytest.approx({"hybrid_gdn": 1.0, "hybrid_ssd": 0.0, "hybrid_blockwise": 0.5})
    spread = gap_spread(results)
    assert spread["hybrid_gdn"] == pytest.approx((1.0, 1.0)) and spread["hybrid_ssd"] == pytest.approx((0.0, 0.0))
    # half of every world's gap, so half of any resample's: (12 - 10) / (14 - 10) = (13 - 10) / (16 - 10) = 0.5
    assert spread["hybrid_blockwise"] == pytest.approx((0.5, 0.5))
    results["hybrid_blockwise"].psnr_tf_worlds["revisit"] = [14.0, 10.0, 12.5, 12.5]  # one world recalls, one not
    low, high = gap_spread(results)["hybrid_blockwise"]
    assert low < 0.4 and high > 0.6


def test_quality_bench_on_the_camera_world(tmp_path):
    out = tmp_path / "camera"
    assert main(["bench", "quality", "--quick", "--world", "camera", "--steps", "1", "--head-dim", "12", "--variants",
                 "full", "sink_window", "--out", str(out)]) == 0
    report = json.loads((out / "quality.json").read_text())
    assert report["setup"]["world_kind"] == "camera" and set(report["results"]) == {"full", "sink_window"}
    assert report["setup"]["head_dim"] == 12  # quick_setup has 8
    header, rule, *rows = [line for line in (out / "quality.md").read_text().splitlines() if line.startswith("|")]
    assert "each true frame's mean colour (no model)" in rows[-1]  # the model-free baseline's row
    assert all(line.count("|") == header.count("|") for line in [rule, *rows])


def test_quality_bench_on_the_scenes_world_with_the_layout_design(tmp_path):
    out, models = tmp_path / "scenes", tmp_path / "models"
    assert main(["bench", "quality", "--quick", "--world", "scenes", "--steps", "1", "--variants", "sink_window",
                 "hybrid_layout", "--out", str(out), "--export", str(models)]) == 0
    report = json.loads((out / "quality.json").read_text())
    assert report["setup"]["world_kind"] == "scenes" and set(report["results"]) == {"sink_window", "hybrid_layout"}
    assert "each true frame's mean colour (no model)" in (out / "quality.md").read_text()  # a layout, not a colour
    memory = WorldModel.load(models / "world_hybrid_layout.safetensors").memory
    setup = QualitySetup.from_record(report["setup"])
    assert memory == setup.memory("hybrid_layout")
    assert (memory.kind, memory.evict_aggregate, memory.global_position, memory.global_time, memory.write_strength) \
        == ("hybrid_blockwise", "token", "learned", "learned", "token")
    assert report["results"]["hybrid_layout"]["state_bytes"] > report["results"]["sink_window"]["state_bytes"]
    # the global state alone: blocks^2 states of heads x head_dim^2 float32 per layer; none for a window
    assert report["results"]["hybrid_layout"]["global_bytes"] == \
        setup.layers * memory.blocks ** 2 * setup.heads * setup.head_dim ** 2 * 4
    assert report["results"]["sink_window"]["global_bytes"] == 0


def test_the_layout_design_has_about_eight_tokens_per_block_and_the_scenes_world_names_its_lags():
    from memkit.bench.quality import scenes_setup

    setup = scenes_setup()
    assert setup.frame_size // setup.patch == 8 and setup.memory("hybrid_layout").blocks == 3  # 64 / 9 tokens
    assert setup.memory("hybrid_blockwise").blocks == setup.blocks  # the registry variant at the bench's default
    assert replace(setup, frame_size=64).memory("hybrid_layout").blocks == 6  # 256 tokens: 36 blocks of ~7
    assert setup.prompts == "places:5" and setup.world(2, 24, 0).prompt_ids == 5  # new, and lags 1-4
    assert setup.train_frames == setup.clip_frames  # a scene video is one clip from its first shot


def test_a_learning_rate_sweep_keeps_the_rate_best_on_validation_worlds_and_the_file_remembers_it(tmp_path):
    out, models = tmp_path / "sweep", tmp_path / "models"
    assert main(["bench", "quality", "--quick", "--steps", "2", "--variants", "sink_window", "--lrs", "1e-4", "3e-2",
                 "--out", str(out), "--export", str(models)]) == 0
    result = json.loads((out / "quality.json").read_text())["results"]["sink_window"]
    sweep = result["lr_sweep"]
    assert set(sweep) == {"0.0001", "0.03"} and sweep["0.0001"] != sweep["0.03"]
    assert result["lr"] == float(max(sweep, key=sweep.get))  # the best on validation, not the worst or the first
    assert f"| {result['lr']:g} (of 0.0001, 0.03) |" in (out / "quality.md").read_text()
    model = WorldModel.load(models / "world_sink_window.safetensors")
    assert model.meta["training"]["setup"]["lr"] == result["lr"] and model.meta["training"]["lr_sweep"] == sweep
    again = tmp_path / "again"  # a model of its own learning rate evaluates with the others' setup
    assert main(["bench", "quality", "--from-models", str(models), "--variants", "sink_window", "--out",
                 str(again)]) == 0
    assert json.loads((again / "quality.json").read_text())["results"]["sink_window"]["lr"] == result["lr"]


def test_validation_worlds_are_not_the_reported_ones_and_returns_are_weighed_at_their_frame():
    from memkit.bench.quality import VALIDATION_WORLDS, VariantResult, held_out, kv_at_returns, return_frames

    setup = replace(quick_setup(), eval_videos=2, eval_frames=24)
    for (_, _, test, _), (_, _, validation, _) in zip(held_out(setup), held_out(setup, VALIDATION_WORLDS)):
        assert not torch.equal(test, validation)
    # a loop video: S A B C A B C A in shots of 3; the returns are shots 4-7, sampled after 12, 15, 18, 21 frames
    loops = replace(QualitySetup(), eval_videos=2)
    assert return_frames(loops) == pytest.approx(16.5)
    results = {"full": VariantResult("full", memory_bytes_per_frame=1000.0)}
    assert kv_at_returns(results, loops) == pytest.approx(16_500)
    assert kv_at_returns({"sink_window": VariantResult("sink_window")}, loops) is None


def test_the_validation_score_is_the_true_past_psnr_of_the_validation_worlds_not_the_reported_ones():
    from memkit.bench.quality import VALIDATION_WORLDS, frame_psnr, validation_score

    setup = replace(quick_setup(), eval_videos=2, eval_frames=12)
    model = WorldModel(setup.backbone(), setup.memory("sink_window"), (setup.frame_size,) * 2,
                       chunk_frames=setup.chunk_frames, prompt_len=setup.prompt_len, prompts=setup.prompts)

    def by_hand(offset):
        source, F, scores = setup.world(2, 12, setup.seed + offset), setup.chunk_frames, []
        for i in range(2):
            truth = source.read(i, 0, 12, (setup.frame_size,) * 2)["video"]
            video = model.rollout(truth[:, :F], source.actions(i), 12, seed=setup.seed + i, history=truth).video
            scores.append(frame_psnr(video[:, F:], truth[:, F:]))
        return float(torch.cat(scores).mean())

    score = validation_score(model, setup)
    assert score == pytest.approx(by_hand(VALIDATION_WORLDS)) and score != pytest.approx(by_hand(10_000))


@pytest.mark.parametrize("flags, message", [
    (["--lr", "1e-3", "--lrs", "1e-3", "3e-3"], "not both"),
    (["--lrs", "1e-3", "1e-3"], "lists a learning rate twice"),
])
def test_a_sweep_given_twice_or_beside_one_rate_is_refused(flags, message, tmp_path, capsys):
    assert main(["bench", "quality", "--quick", *flags, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_free_rollout_is_scored_against_its_own_last_showing_of_each_place():
    from memkit.bench.quality import frame_psnr, self_psnr
    from memkit.data import loop_labels

    a, b = torch.full((3, 2, 2), 0.5), torch.full((3, 2, 2), -0.5)
    again = a + 0.1  # the place shown again, a little off
    video = torch.stack([a, a, a, b, b, b, again, again, again], dim=1)
    last_seen = loop_labels(torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 0]), chunk=3)["last_seen"]
    scores = self_psnr(video, last_seen, 3)
    # a new place against the frame before its chunk (2); a return against its place's last frame (2)
    expected = torch.cat([frame_psnr(video[:, 3:6], a[:, None].expand(3, 3, 2, 2)),
                          frame_psnr(video[:, 6:9], a[:, None].expand(3, 3, 2, 2))])
    assert torch.allclose(scores, expected)
    assert scores[3:].min() > scores[:3].max() + 10  # the return is close, the new place far


def test_frame_means_score_the_colour_alone_against_a_hand_computed_psnr():
    from memkit.bench.quality import frame_means, frame_psnr

    gen = torch.Generator().manual_seed(0)
    colours = torch.tensor([[0.2, -0.4, 0.6], [-0.5, 0.3, 0.0]]).T  # (3 channels, 2 frames)
    truth = colours[:, :, None, None].expand(3, 2, 4, 4)
    texture = torch.randn(3, 2, 4, 4, generator=gen)
    texture -= texture.mean(dim=(2, 3), keepdim=True)  # no colour of its own
    off = torch.tensor([[0.1, -0.1, 0.1], [0.2, 0.2, -0.2]]).T  # per channel and frame
    sample = truth + off[:, :, None, None] + 0.4 * texture  # each colour off, under a texture of its own
    # by hand: frame 0's means differ by 0.1 in every channel (MSE 0.01), frame 1's by 0.2 (MSE 0.04):
    # PSNR 10 log10(2^2 / MSE) = 26.02 and 20.00 dB
    expected = torch.tensor([26.0206, 20.0])
    assert torch.allclose(frame_psnr(frame_means(sample), frame_means(truth)), expected, atol=1e-3)
    pixel = 10 * torch.log10(4 / ((sample - truth) ** 2).mean(dim=(0, 2, 3)))
    assert torch.allclose(frame_psnr(sample, truth), pixel, atol=1e-4) and (pixel < expected).all()  # texture costs
