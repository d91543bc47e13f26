"""load_wan_checkpoint against synthetic checkpoints written in the original Wan2.1 layout.

The synthetic state dict and the name mapping used to check the result are written here from the original
WanModel layout, independently of the diffusers converter the loader uses.
"""

import json
import math
import re

import pytest
import torch
from diffusers import SkyReelsV2Transformer3DModel, WanTransformer3DModel
from safetensors.torch import save_file

from adapters.wan_checkpoint import WanLoadReport, load_wan_checkpoint
from memkit.errors import CheckpointError

TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=8,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=32,
)


def original_wan_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of the original Wan2.1 ``WanModel`` (cross_attn_norm=True)."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    ffn, patch = config["ffn_dim"], tuple(config["patch_size"])
    shapes = {
        "patch_embedding.weight": (dim, config["in_channels"], *patch),
        "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, config["text_dim"]),
        "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim),
        "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, config["freq_dim"]),
        "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim),
        "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim),
        "time_projection.1.bias": (6 * dim,),
    }
    if config.get("inject_sample_info"):  # SkyReels-V2
        shapes.update({
            "fps_embedding.weight": (2, dim),
            "fps_projection.0.weight": (dim, dim),
            "fps_projection.0.bias": (dim,),
            "fps_projection.2.weight": (6 * dim, dim),
            "fps_projection.2.bias": (6 * dim,),
        })
    for i in range(config["num_layers"]):
        block = f"blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                shapes[f"{block}.{attn}.{proj}.weight"] = (dim, dim)
                shapes[f"{block}.{attn}.{proj}.bias"] = (dim,)
            shapes[f"{block}.{attn}.norm_q.weight"] = (dim,)
            shapes[f"{block}.{attn}.norm_k.weight"] = (dim,)
        shapes[f"{block}.norm3.weight"] = (dim,)
        shapes[f"{block}.norm3.bias"] = (dim,)
        shapes[f"{block}.ffn.0.weight"] = (ffn, dim)
        shapes[f"{block}.ffn.0.bias"] = (ffn,)
        shapes[f"{block}.ffn.2.weight"] = (dim, ffn)
        shapes[f"{block}.ffn.2.bias"] = (dim,)
        shapes[f"{block}.modulation"] = (1, 6, dim)
    shapes["head.head.weight"] = (config["out_channels"] * math.prod(patch), dim)
    shapes["head.head.bias"] = (config["out_channels"] * math.prod(patch),)
    shapes["head.modulation"] = (1, 2, dim)
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


_TOP_LEVEL_NAMES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "fps_embedding": "fps_embedding",
    "fps_projection.0": "fps_projection.net.0.proj",
    "fps_projection.2": "fps_projection.net.2",
    "head.head": "proj_out",
}
_BLOCK_NAMES = {
    **{f"self_attn.{p}": f"attn1.to_{p}" for p in "qkv"},
    **{f"cross_attn.{p}": f"attn2.to_{p}" for p in "qkv"},
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.o": "attn2.to_out.0",
    **{f"{a}.norm_{p}": f"{b}.norm_{p}" for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2")) for p in "qk"},
    "norm3": "norm2",  # the original's affine cross-attention norm is diffusers' norm2
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}


def diffusers_name(original: str) -> str:
    if original == "head.modulation":
        return "scale_shift_table"
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", original)
    if block:
        index, rest = block.groups()
        if rest == "modulation":
            return f"blocks.{index}.scale_shift_table"
        module, leaf = rest.rsplit(".", 1)
        return f"blocks.{index}.{_BLOCK_NAMES[module]}.{leaf}"
    module, leaf = original.rsplit(".", 1)
    return f"{_TOP_LEVEL_NAMES[module]}.{leaf}"


class NotATensor:
    """Something only full unpickling can restore."""

    def __init__(self):
        self.note = "needs the class"


def tiny_model(cls=WanTransformer3DModel, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(**{**TINY, **overrides}).eval()


def snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name


def assert_holds(model, original):
    """Each original tensor sits in the model under its independently mapped name, and nothing is left at init."""
    state = model.state_dict()
    for name, value in original.items():
        assert torch.equal(state[diffusers_name(name)], value.to(state[diffusers_name(name)].dtype)), name
    values = list(original.values())
    for name, tensor in state.items():
        assert any(v.shape == tensor.shape and torch.equal(v.to(tensor.dtype), tensor) for v in values), name


def forward(model):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 4, 2, 4, 4, generator=generator)
    text = torch.randn(1, 3, 16, generator=generator)
    with torch.no_grad():
        out = model(hidden_states=hidden, timestep=torch.tensor([500]), encoder_hidden_states=text, return_dict=False)
    return out[0]


@pytest.fixture(scope="module")
def original():
    return original_wan_state_dict(TINY, seed=1)


def test_flat_state_dict_maps_every_key(tmp_path, original):
    torch.save(original, tmp_path / "wan.pt")
    model = tiny_model()
    report = load_wan_checkpoint(model, tmp_path / "wan.pt")
    assert isinstance(report, WanLoadReport)
    assert report.container_key is None and report.key_naming == "original"
    assert report.loaded == len(original) == len(model.state_dict())
    assert report.missing == () and report.unexpected == () and report.skipped_lora == () and report.complete
    assert report.dtype_conversions == {}
    assert_holds(model, original)
    assert torch.equal(model.blocks[0].attn1.to_q.weight, original["blocks.0.self_attn.q.weight"])
    assert torch.equal(model.blocks[1].attn2.to_out[0].bias, original["blocks.1.cross_attn.o.bias"])
    assert torch.equal(model.blocks[1].norm2.weight, original["blocks.1.norm3.weight"])
    assert torch.equal(model.blocks[0].scale_shift_table, original["blocks.0.modulation"])
    assert torch.equal(model.scale_shift_table, original["head.modulation"])
    assert torch.equal(model.proj_out.weight, original["head.head.weight"])
    assert f"loaded {len(original)} tensors" in str(report)


def test_forward_matches_a_model_loaded_by_independent_names(tmp_path, original):
    torch.save(original, tmp_path / "wan.pt")
    model = tiny_model()
    before = forward(model)
    load_wan_checkpoint(model, tmp_path / "wan.pt")
    reference = tiny_model()
    reference.load_state_dict({diffusers_name(k): v for k, v in original.items()}, strict=True)
    after = forward(model)
    assert torch.isfinite(after).all()
    assert not torch.allclose(before, after)
    assert torch.equal(after, forward(reference))


def test_self_forcing_checkpoint_prefers_ema_and_key_overrides(tmp_path, original):
    ema = original_wan_state_dict(TINY, seed=2)
    torch.save(
        {
            "generator": {"model." + k: v for k, v in original.items()},
            "generator_ema": {"model." + k: v for k, v in ema.items()},
            "step": 600,
        },
        tmp_path / "self_forcing_dmd.pt",
    )
    model = tiny_model()
    report = load_wan_checkpoint(model, tmp_path / "self_forcing_dmd.pt", strict=True)
    assert report.container_key == "generator_ema" and report.complete
    assert_holds(model, ema)
    report = load_wan_checkpoint(model, tmp_path / "self_forcing_dmd.pt", key="generator", strict=True)
    assert report.container_key == "generator"
    assert_holds(model, original)


def fsdp_name(name: str) -> str:
    name = re.sub(r"^(blocks\.\d+)\.", r"\1._fsdp_wrapped_module._checkpoint_wrapped_module.", name)
    return "_orig_mod.model._fsdp_wrapped_module." + name


def test_fsdp_compile_and_ddp_prefixes_are_stripped(tmp_path, original):
    torch.save({"module": {fsdp_name(k): v for k, v in original.items()}}, tmp_path / "fsdp.pth")
    model = tiny_model()
    report = load_wan_checkpoint(model, tmp_path / "fsdp.pth", strict=True)
    assert report.container_key == "module" and report.loaded == len(original)
    assert_holds(model, original)


def test_model_inside_a_key_is_not_a_wrapper(tmp_path, original):
    extra = torch.zeros(3)
    torch.save({"model." + k: v for k, v in {**original, "blocks.0.model.extra": extra}.items()}, tmp_path / "x.pt")
    model = tiny_model()
    report = load_wan_checkpoint(model, tmp_path / "x.pt")
    assert report.unexpected == ("blocks.0.model.extra",) and report.missing == ()
    assert_holds(model, original)


def test_bf16_safetensors_with_comfy_prefix_is_cast(tmp_path, original):
    save_file({"model.diffusion_model." + k: v.bfloat16() for k, v in original.items()}, tmp_path / "wan.safetensors")
    model = tiny_model()
    report = load_wan_checkpoint(model, tmp_path / "wan.safetensors", strict=True)
    assert report.dtype_conversions == {"bfloat16 -> float32": len(original)}
    assert f"bfloat16 -> float32 x{len(original)}" in str(report)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.float32
    assert_holds(model, {k: v.bfloat16() for k, v in original.items()})


def test_values_take_the_dtype_of_a_bf16_model(tmp_path, original):
    torch.save(original, tmp_path / "wan.pt")
    model = tiny_model().to(torch.bfloat16)
    report = load_wan_checkpoint(model, tmp_path / "wan.pt", strict=True)
    assert report.dtype_conversions == {"float32 -> bfloat16": len(original)}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert_holds(model, original)


def test_a_model_on_the_meta_device_is_refused(tmp_path, original):
    torch.save(original, tmp_path / "wan.pt")
    with torch.device("meta"):
        model = WanTransformer3DModel(**TINY)
    with pytest.raises(CheckpointError, match="meta device"):
        load_wan_checkpoint(model, tmp_path / "wan.pt")


def test_sharded_directory_loads_every_shard(tmp_path, original):
    names = list(original)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[:40],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[40:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: original[k] for k in keys}, tmp_path / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = tiny_model()
    report = load_wan_checkpoint(model, tmp_path, strict=True)
    assert report.loaded == len(original)
    assert_holds(model, original)

    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    before = snapshot(tiny_model())
    fresh = tiny_model()
    with pytest.raises(CheckpointError, match="absent"):
        load_wan_checkpoint(fresh, tmp_path)
    assert_unchanged(fresh, before)


def test_lora_tensors_are_skipped_and_reported(tmp_path, original):
    lora = {"blocks.0.self_attn.q.lora_A.default.weight": torch.zeros(4, 24),
            "blocks.0.self_attn.q.lora_B.default.weight": torch.zeros(24, 4)}
    torch.save({"generator": {"model." + k: v for k, v in {**original, **lora}.items()}}, tmp_path / "x.pt")
    model = tiny_model()
    report = load_wan_checkpoint(model, tmp_path / "x.pt", strict=True)
    assert report.skipped_lora == tuple(lora) and report.unexpected == ()
    assert "LongLive" in str(report)
    assert_holds(model, original)

    torch.save(lora, tmp_path / "lora.pt")
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="only LoRA"):
        load_wan_checkpoint(model, tmp_path / "lora.pt")
    assert_unchanged(model, before)


def test_skyreels_fps_modules_load(tmp_path):
    config = {**TINY, "inject_sample_info": True}
    original = original_wan_state_dict(config, seed=4)
    save_file(original, tmp_path / "skyreels.safetensors")
    model = tiny_model(SkyReelsV2Transformer3DModel, inject_sample_info=True)
    report = load_wan_checkpoint(model, tmp_path / "skyreels.safetensors", strict=True)
    assert report.loaded == len(original)
    assert_holds(model, original)
    assert torch.equal(model.fps_projection.net[0].proj.weight, original["fps_projection.0.weight"])


def test_diffusers_named_file_loads_as_is(tmp_path):
    source = tiny_model(num_layers=2)
    torch.nn.init.normal_(source.blocks[1].norm2.weight)
    save_file(source.state_dict(), tmp_path / "diffusers.safetensors")
    model = tiny_model()
    torch.nn.init.zeros_(model.blocks[1].norm2.weight)
    report = load_wan_checkpoint(model, tmp_path / "diffusers.safetensors", strict=True)
    assert report.key_naming == "diffusers"
    assert_unchanged(model, snapshot(source))


def test_strict_refuses_a_missing_key_and_lenient_reports_it(tmp_path, original):
    partial = {k: v for k, v in original.items() if k != "blocks.1.norm3.bias"}
    torch.save(partial, tmp_path / "partial.pt")
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"strict=True.*blocks\.1\.norm2\.bias"):
        load_wan_checkpoint(model, tmp_path / "partial.pt", strict=True)
    assert_unchanged(model, before)
    report = load_wan_checkpoint(model, tmp_path / "partial.pt")
    assert report.missing == ("blocks.1.norm2.bias",) and not report.complete
    assert torch.equal(model.blocks[1].norm2.bias, before["blocks.1.norm2.bias"])


def _unrelated_llm():
    return {"model.embed_tokens.weight": torch.zeros(10, 8),
            "model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8),
            "model.norm.weight": torch.ones(8), "lm_head.weight": torch.zeros(10, 8)}


def _unrelated_unet():
    return {"conv_in.weight": torch.zeros(4, 4, 3, 3), "time_embedding.linear_1.weight": torch.zeros(8, 4),
            "down_blocks.0.attentions.0.proj_out.weight": torch.zeros(8, 8)}


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (_unrelated_llm, r"not a Wan-format checkpoint.*model\.embed_tokens\.weight"),
        (_unrelated_unet, r"not a Wan-format checkpoint.*conv_in\.weight"),
        (lambda: original_wan_state_dict({**TINY, "num_attention_heads": 4}, seed=5),
         r"different Wan architecture: 'patch_embedding\.weight'.*\(48, 4, 1, 2, 2\).*\(24, 4, 1, 2, 2\)"
         r".*File: dim=48, blocks=2, heads=4.*model: dim=24, blocks=2, heads=2"),
        (lambda: original_wan_state_dict({**TINY, "num_layers": 3}, seed=5),
         r"different Wan architecture: it has 3 transformer blocks, the model 2"),
        (lambda: {"generator": {"model." + k: v for k, v in original_wan_state_dict(TINY, 5).items()},
                  "config": NotATensor()},
         r"refuses to unpickle.*NotATensor"),
    ],
    ids=["llm", "unet", "bigger-dim", "more-blocks", "pickle"],
)
def test_foreign_checkpoints_are_rejected_before_any_write(tmp_path, make, match):
    torch.save(make(), tmp_path / "foreign.pt")
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=match):
        load_wan_checkpoint(model, tmp_path / "foreign.pt")
    assert_unchanged(model, before)


def test_absent_container_key_lists_the_available_ones(tmp_path, original):
    torch.save({"generator": original, "critic": original}, tmp_path / "ckpt.pt")
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"no container 'generator_emma'.*'generator', 'critic'"):
        load_wan_checkpoint(model, tmp_path / "ckpt.pt", key="generator_emma")
    assert_unchanged(model, before)


def test_unreadable_and_unsupported_inputs(tmp_path, original):
    torch.save(original, tmp_path / "whole.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:200])
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    (tmp_path / "wan.ckpt").write_text("")
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_wan_checkpoint(model, tmp_path / "truncated.pt")
    with pytest.raises(CheckpointError, match="refuses to unpickle.*rejected it"):
        load_wan_checkpoint(model, tmp_path / "garbage.pt")
    with pytest.raises(CheckpointError, match="unknown checkpoint suffix"):
        load_wan_checkpoint(model, tmp_path / "wan.ckpt")
    with pytest.raises(FileNotFoundError):
        load_wan_checkpoint(model, tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="WanTransformer3DModel"):
        load_wan_checkpoint(torch.nn.Linear(2, 2), tmp_path / "garbage.pt")
    assert_unchanged(model, before)
