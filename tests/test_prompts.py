"""Prompt embedding files, prompt schedules, random prompts, and encoding with a local (tiny, random) UMT5 encoder."""

import shutil
import sys

import pytest
import torch
from backbones import inject, tiny_model
from safetensors.torch import save_file

import adapters
from memkit.errors import ConfigError, DTypeError, NonFiniteError, ShapeError, StateFormatError
from memkit.rollout import PromptSchedule, StreamingGenerator
from memkit.rollout.prompts import (
    clean_prompt,
    encode_prompts,
    load_prompt_embeds,
    random_prompt_embeds,
    save_prompt_embeds,
)
from memkit.state import io

WORDS = "a cat dog runs on the beach at sunset red car drives fast through city".split()


# ---------------------------------------------------------------------------------------------- files


def test_round_trip_keeps_order_shape_and_dtype(tmp_path):
    gen = torch.Generator().manual_seed(0)
    embeds = {
        "zebra": torch.randn(5, 8, generator=gen),
        "apple": torch.randn(1, 3, 8, generator=gen).to(torch.bfloat16),
        "mango": torch.randn(1, 7, 8, generator=gen, dtype=torch.float64),
    }
    path = tmp_path / "sub" / "prompts.safetensors"
    save_prompt_embeds(path, embeds)
    loaded = load_prompt_embeds(path)
    assert list(loaded) == ["zebra", "apple", "mango"]
    assert loaded["zebra"].shape == (1, 5, 8) and torch.equal(loaded["zebra"][0], embeds["zebra"])
    for name in ("apple", "mango"):
        assert loaded[name].dtype == embeds[name].dtype and torch.equal(loaded[name], embeds[name])


def test_plain_safetensors_file_loads_sorted(tmp_path):
    save_file({"b": torch.ones(4, 6), "a": torch.zeros(1, 2, 6)}, str(tmp_path / "plain.safetensors"))
    loaded = load_prompt_embeds(tmp_path / "plain.safetensors")
    assert list(loaded) == ["a", "b"] and loaded["b"].shape == (1, 4, 6)


@pytest.mark.parametrize(
    "tensors, error, message",
    [
        ({"p": torch.zeros(1, 1, 2, 8)}, ShapeError, "shape"),
        ({"p": torch.zeros(2, 3, 8)}, ShapeError, "shape"),
        ({"p": torch.zeros(8)}, ShapeError, "shape"),
        ({"p": torch.zeros(3, 8, dtype=torch.int64)}, DTypeError, "floating"),
        ({"p": torch.tensor([[0.0, float("nan")]])}, NonFiniteError, "NaN"),
        ({"p": torch.zeros(3, 8), "q": torch.zeros(3, 4)}, ShapeError, "text_dim"),
        ({"p": torch.zeros(0, 8)}, ShapeError, "empty"),
    ],
    ids=["rank4", "batch2", "rank1", "integer", "nan", "mixed_dims", "empty"],
)
def test_bad_embeddings_are_refused_on_load_and_save(tmp_path, tensors, error, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(error, match=message):
        load_prompt_embeds(path)
    with pytest.raises(error, match=message):
        save_prompt_embeds(tmp_path / "out.safetensors", tensors)


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_prompt_embeds(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(StateFormatError, match="not a readable safetensors"):
        load_prompt_embeds(tmp_path / "junk.safetensors")
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(StateFormatError, match="no prompt embeddings"):
        load_prompt_embeds(tmp_path / "empty.safetensors")
    io.write(tmp_path / "order.safetensors", {"a": torch.zeros(2, 4)}, {"kind": "prompt_embeds", "order": ["b"]})
    with pytest.raises(StateFormatError, match="order"):
        load_prompt_embeds(tmp_path / "order.safetensors")
    io.write(tmp_path / "state.safetensors", {"a": torch.zeros(2, 4)}, {"kind": "memory_state"})
    with pytest.raises(StateFormatError, match="not prompt embeddings"):
        load_prompt_embeds(tmp_path / "state.safetensors")
    with pytest.raises(ConfigError):
        save_prompt_embeds(tmp_path / "x.safetensors", {})
    with pytest.raises(ConfigError):
        save_prompt_embeds(tmp_path / "x.safetensors", {"": torch.zeros(2, 4)})


def test_random_prompt_embeds():
    first = random_prompt_embeds(3, 7, 16, seed=5)
    assert list(first) == ["prompt_0", "prompt_1", "prompt_2"]
    assert all(t.shape == (1, 7, 16) and t.dtype == torch.float32 for t in first.values())
    again = random_prompt_embeds(3, 7, 16, seed=5)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["prompt_0"], random_prompt_embeds(1, 7, 16, seed=6)["prompt_0"])
    with pytest.raises(ConfigError):
        random_prompt_embeds(0, 7, 16, seed=0)


# ---------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("form", ["tensor", "list", "mapping"])
def test_prompt_schedule_refuses_a_non_finite_prompt(form, bad):
    good = torch.zeros(1, 3, 8)
    poisoned = torch.zeros(3, 8)
    poisoned[1, 2] = bad
    prompts = {"tensor": poisoned, "list": [good, poisoned], "mapping": {"calm": good, "broken": poisoned}}[form]
    switches = () if form == "tensor" else [2]
    with pytest.raises(NonFiniteError, match="'broken'" if form == "mapping" else "prompt"):
        PromptSchedule(prompts, switches=switches)


def test_a_non_finite_prompt_is_refused_by_a_generator_whose_memory_skips_finite_checks():
    model = tiny_model("wan")
    h = inject(model, "sink_window", chunk_frames=3, sink_frames=1, window_frames=3, check_finite=False)
    prompt = torch.randn(1, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prompt[0, 2, 3] = float("nan")
    try:
        with pytest.raises(NonFiniteError, match="NaN"):
            StreamingGenerator(h, prompt, progress=False)
        with pytest.raises(NonFiniteError, match="NaN"):
            StreamingGenerator(h, [prompt.nan_to_num(0.0), prompt], switches=[1], progress=False)
        # the same prompt made finite streams: the refusal is the NaN's alone
        chunk = next(StreamingGenerator(h, prompt.nan_to_num(0.0), progress=False).stream(1))
        assert torch.isfinite(chunk.latents).all()
    finally:
        adapters.remove(model)


# ---------------------------------------------------------------------------------------------- encoding


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A diffusers-style folder: text_encoder/ (a tiny random UMT5 encoder) and tokenizer/ (a word-level one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("wan")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(root / "tokenizer")
    config = UMT5Config(vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    UMT5EncoderModel(config).save_pretrained(root / "text_encoder")
    return root


def direct_encode(folder, texts, max_length, dtype=torch.float32):
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    model = UMT5EncoderModel.from_pretrained(str(folder / "text_encoder"), dtype=dtype).eval()
    tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return hidden, tokens.attention_mask.sum(dim=1)


@pytest.mark.parametrize("where", ["text_encoder", "root"])
def test_encode_prompts_matches_the_encoder(checkpoint, where):
    texts = ["a cat runs on the beach", "red car drives fast through the city at sunset", "dog"]
    folder = checkpoint / "text_encoder" if where == "text_encoder" else checkpoint
    embeds = encode_prompts(texts, folder, max_length=12)
    hidden, lengths = direct_encode(checkpoint, texts, 12)
    assert embeds.shape == (3, 12, 16) and embeds.dtype == torch.float32
    assert lengths.tolist() == [7, 10, 2]  # words + </s>
    for row, length in enumerate(lengths.tolist()):
        assert torch.equal(embeds[row, :length], hidden[row, :length])
        assert embeds[row, length:].abs().sum() == 0
        assert hidden[row, length:].abs().sum() > 0  # the encoder itself does not zero the padding


def test_encode_prompts_cleans_truncates_and_casts(checkpoint):
    messy = encode_prompts(["  a   cat\n runs &amp;amp; "], checkpoint, max_length=8, dtype=torch.float64)
    clean = encode_prompts("a cat runs &", checkpoint, max_length=8, dtype=torch.float64)
    assert clean_prompt("  a   cat\n runs &amp;amp; ") == "a cat runs &"
    assert messy.dtype == torch.float64 and torch.equal(messy, clean)
    long = encode_prompts(" ".join(WORDS), checkpoint, max_length=4)
    assert long.shape == (1, 4, 16) and (long.abs().sum(dim=-1) > 0).all()


def test_encode_prompts_refusals(checkpoint, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no text encoder folder"):
        encode_prompts(["a cat"], tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        encode_prompts(["a cat"], tmp_path)
    lonely = tmp_path / "lonely"
    shutil.copytree(checkpoint / "text_encoder", lonely)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        encode_prompts(["a cat"], lonely)
    with pytest.raises(ConfigError):
        encode_prompts([], checkpoint)
    with pytest.raises(ConfigError):
        encode_prompts(["a cat"], checkpoint, max_length=0)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match="transformers"):
        encode_prompts(["a cat"], checkpoint)
