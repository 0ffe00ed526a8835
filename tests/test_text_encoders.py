"""Text encoders against independent references: open_clip's own tokenizer and forward pass, and transformers'
CLIPTextModel. Everything is built tiny and in-process; nothing is downloaded."""

import copy
import shutil

import open_clip
import pytest
import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.models.clip_convert import open_clip_to_hf
from ldm.models.freeze import freeze, is_frozen
from ldm.models.text_encoders import (
    HFCLIPTextEncoder,
    OpenCLIPTextEncoder,
    hf_clip_text_encoder,
    open_clip_text_encoder,
    save_open_clip_checkpoint,
    save_random_hf_clip,
)
from ldm.models.tokenizer import clip_vocab_and_merges, write_clip_tokenizer

ARCH = "ViT-B-32"
TINY = dict(  # open_clip replaces whole config entries, so each dict is complete
    embed_dim=16,
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=3),
    vision_cfg=dict(image_size=32, patch_size=16, width=32, layers=1, head_width=16),
)
CAPTIONS = [
    "A photo of a CAT!!",
    "hi ! x! !? a dog, on a skate-board; (really) #1 @home 50% $3.99 ...",
    "Hello, World. 1234 5.6 x_y it's they're I'LL we'd",
    "café naïve Zürich 日本語の写真 🐶🎨 ÉMOJI ß",
    "  many   spaces\tand\nnewlines  ",
    "",
    " ".join(["a very long caption about a red fox jumping over the lazy dog"] * 12),  # > 77 tokens
]
EOT, SOT = 49407, 49406


def _hf_ids(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _all_frozen(module: nn.Module) -> bool:
    return all(not p.requires_grad for p in module.parameters()) and not any(m.training for m in module.modules())


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    write_clip_tokenizer(root / "eot")
    write_clip_tokenizer(root / "bang", pad_token="!")
    return root


def test_vocab_order_equals_open_clip_simple_tokenizer():
    vocab, merges = clip_vocab_and_merges()
    reference = open_clip.tokenizer.SimpleTokenizer()
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert vocab == {renamed.get(token, token): i for token, i in reference.encoder.items()}
    assert len(vocab) == 49408 and (vocab["!"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (0, SOT, EOT)
    assert {m: r for r, m in enumerate(merges)} == reference.bpe_ranks


def test_long_caption_really_needs_truncation():
    assert len(open_clip.tokenizer.SimpleTokenizer().encode(CAPTIONS[-1])) > 77


@pytest.mark.parametrize("files", ["all", "vocab_and_merges_only"])
def test_pad_bang_tokenizer_equals_open_clip_exactly(tokenizer_dirs, tmp_path, files):
    path = tokenizer_dirs / "bang"
    if files == "vocab_and_merges_only":  # what Stable Diffusion repos ship, and what transformers 4 reads
        path = tmp_path / "legacy"
        path.mkdir()
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(tokenizer_dirs / "bang" / name, path / name)
    tokenizer = CLIPTokenizer.from_pretrained(path)
    assert tokenizer.pad_token_id == 0 and tokenizer.model_max_length == 77
    ids = _hf_ids(tokenizer, CAPTIONS)
    reference = open_clip.get_tokenizer(ARCH)(CAPTIONS)
    assert torch.equal(ids, reference)


def test_pad_eot_tokenizer_equals_open_clip_up_to_padding(tokenizer_dirs):
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dirs / "eot")
    assert tokenizer.pad_token_id == EOT
    ids = _hf_ids(tokenizer, CAPTIONS)
    expected = open_clip.tokenize(CAPTIONS).clone()
    first_eot = (expected == EOT).int().argmax(dim=1, keepdim=True)  # padding = every position after it
    expected[torch.arange(77) > first_eot] = EOT
    assert torch.equal(ids, expected)
    assert (ids[:, 0] == SOT).all() and ids[-1, -1] == EOT  # the truncated caption still ends in end-of-text


def test_write_clip_tokenizer_rejects_unknown_pad(tmp_path):
    with pytest.raises(ValueError, match="pad_token"):
        write_clip_tokenizer(tmp_path, pad_token="<pad>")


# ---------------------------------------------------------------- freeze


def _unfreeze(module: nn.Module) -> nn.Module:
    """Undo `freeze` (drop the instance's `train` shadow): freezing touches only that instance, so this restores it."""
    del module.train
    return module.requires_grad_(True).train()


def test_freeze_stays_eval_under_parent_train_and_unfreezes():
    torch.manual_seed(0)
    frozen = freeze(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)))
    parent = nn.ModuleDict({"frozen": frozen, "trained": nn.Linear(8, 8)})
    parent.train()  # what Lightning does at the start of each epoch
    assert parent.training and parent["trained"].training and is_frozen(frozen) and _all_frozen(frozen)
    x = torch.randn(4, 8)
    assert torch.equal(frozen(x), frozen(x))  # dropout really is off
    assert _all_frozen(copy.deepcopy(parent)["frozen"].train())  # survives copying
    assert parent.state_dict().keys() == {"frozen.0.weight", "frozen.0.bias", "trained.weight", "trained.bias"}

    _unfreeze(frozen)
    parent.train()
    assert not is_frozen(frozen) and frozen[1].training and all(p.requires_grad for p in frozen.parameters())


# ---------------------------------------------------------------- transformers CLIPTextModel


@pytest.fixture(scope="module")
def random_hf_clip(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tiny_clip")
    text_encoder, tokenizer = save_random_hf_clip(out_dir, hidden_size=64, num_layers=2, num_heads=4, seed=0)
    return out_dir, text_encoder, tokenizer


@pytest.fixture(scope="module")
def hf_encoder(random_hf_clip):
    return hf_clip_text_encoder(random_hf_clip[0])


def test_save_random_hf_clip_round_trip(random_hf_clip, hf_encoder):
    out_dir, text_encoder, tokenizer = random_hf_clip
    assert (out_dir / "text_encoder" / "config.json").is_file() and (out_dir / "tokenizer" / "vocab.json").is_file()
    encoder = hf_encoder
    assert isinstance(encoder, HFCLIPTextEncoder) and (encoder.hidden_size, encoder.max_length) == (64, 77)

    hidden = encoder.encode(CAPTIONS[:3])
    assert hidden.shape == (3, 77, 64) and hidden.dtype == torch.float32
    with torch.no_grad():
        expected = text_encoder.eval()(_hf_ids(tokenizer, CAPTIONS[:3])).last_hidden_state
    assert torch.equal(hidden, expected)
    assert torch.equal(encoder.tokenize(CAPTIONS), open_clip.tokenize(CAPTIONS).masked_fill(
        torch.arange(77) > (open_clip.tokenize(CAPTIONS) == EOT).int().argmax(1, keepdim=True), EOT))


def test_hf_encoder_is_frozen_and_stays_eval(hf_encoder):
    lightning_like = nn.ModuleDict({"text_encoder": hf_encoder, "unet": nn.Linear(64, 64)})
    lightning_like.train()
    assert _all_frozen(hf_encoder) and lightning_like["unet"].training


def test_save_random_hf_clip_is_seeded_and_leaves_global_rng_alone(random_hf_clip, tmp_path):
    _, text_encoder, _ = random_hf_clip
    state = torch.random.get_rng_state()
    same, _ = save_random_hf_clip(tmp_path / "same", seed=0)
    other, _ = save_random_hf_clip(tmp_path / "other", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    weight = "embeddings.token_embedding.weight"
    assert torch.equal(same.state_dict()[weight], text_encoder.state_dict()[weight])
    assert not torch.equal(other.state_dict()[weight], text_encoder.state_dict()[weight])


def test_clip_skip_equals_a_model_cut_to_fewer_layers(random_hf_clip):
    _, text_encoder, tokenizer = random_hf_clip
    skipped = HFCLIPTextEncoder(text_encoder, tokenizer, clip_skip=1)
    # Independent reference: transformers' own forward on a 1-layer copy (layer 2 dropped, final norm kept).
    config = copy.deepcopy(text_encoder.config)
    config.num_hidden_layers = 1
    one_layer = CLIPTextModel(config).eval()
    missing, unexpected = one_layer.load_state_dict(text_encoder.state_dict(), strict=False)
    assert not missing and unexpected and all(".layers.1." in k for k in unexpected)
    ids = _hf_ids(tokenizer, CAPTIONS[:2])
    with torch.no_grad():
        torch.testing.assert_close(skipped(ids), one_layer(ids).last_hidden_state)
        assert not torch.allclose(skipped(ids), text_encoder(ids).last_hidden_state, atol=1e-3)
    # the layer it skips is the one whose adapters a text-encoder LoRA leaves out of training (LatentDiffusion)
    layers = text_encoder.encoder.layers if hasattr(text_encoder, "encoder") else text_encoder.text_model.encoder.layers
    assert skipped.unread_layers() == [layers[1]]
    assert HFCLIPTextEncoder(text_encoder, tokenizer).unread_layers() == []
    with pytest.raises(ValueError, match="clip_skip"):
        HFCLIPTextEncoder(text_encoder, tokenizer, clip_skip=2)


def test_hf_encoder_dtype_and_caption_type_errors(random_hf_clip):
    encoder = hf_clip_text_encoder(random_hf_clip[0], torch_dtype="bfloat16")
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError, match="captions"):
        encoder.tokenize("a single string")


# ---------------------------------------------------------------- open_clip


def _tiny_open_clip(**overrides):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(ARCH, **TINY, **overrides)
        # open_clip initialises biases to 0 and norms to 1; perturb them so that every weight mapping matters.
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def open_clip_model():
    return _tiny_open_clip()


@pytest.fixture(scope="module")
def oc_tokenizer():
    return open_clip.get_tokenizer(ARCH)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_checkpoint_round_trip(open_clip_model, oc_tokenizer, tmp_path, suffix):
    path = save_open_clip_checkpoint(open_clip_model, tmp_path / f"tiny{suffix}")
    loaded = open_clip_text_encoder(ARCH, pretrained=str(path), **TINY)
    in_memory = OpenCLIPTextEncoder(open_clip_model, oc_tokenizer)
    assert (loaded.hidden_size, loaded.max_length) == (32, 77)
    assert not any(k.startswith("visual") for k in loaded.state_dict())  # the vision tower is dropped
    with torch.no_grad():
        assert torch.equal(loaded.encode(CAPTIONS), in_memory.encode(CAPTIONS))


def test_open_clip_encoder_is_frozen_and_stays_eval(open_clip_model, tmp_path):
    path = save_open_clip_checkpoint(open_clip_model, tmp_path / "tiny.safetensors")
    encoder = open_clip_text_encoder(ARCH, pretrained=str(path), **TINY)
    lightning_like = nn.ModuleDict({"text_encoder": encoder, "unet": nn.Linear(32, 32)})
    lightning_like.train()
    assert _all_frozen(encoder)


def _open_clip_reference(model, ids, block_index):
    """ln_final(output of resblocks[block_index]), captured with a hook on open_clip's own encode_text."""
    captured = {}
    handle = model.transformer.resblocks[block_index].register_forward_hook(
        lambda module, args, output: captured.setdefault("x", output)
    )
    try:
        model.encode_text(ids)
    finally:
        handle.remove()
    x = captured["x"]
    x = x if model.transformer.batch_first else x.transpose(0, 1)
    return model.ln_final(x)


@torch.no_grad()
def test_open_clip_layers_equal_open_clip_internals(open_clip_model, oc_tokenizer):
    tokenizer = oc_tokenizer
    penultimate = OpenCLIPTextEncoder(open_clip_model, tokenizer, layer="penultimate")
    last = OpenCLIPTextEncoder(open_clip_model, tokenizer, layer="last")
    assert (len(penultimate.resblocks), len(last.resblocks)) == (2, 3)
    ids = tokenizer(CAPTIONS)
    out_penultimate, out_last = penultimate(ids), last(ids)
    assert out_penultimate.shape == out_last.shape == (len(CAPTIONS), 77, 32)
    torch.testing.assert_close(out_penultimate, _open_clip_reference(open_clip_model, ids, -2))
    torch.testing.assert_close(out_last, _open_clip_reference(open_clip_model, ids, -1))
    assert not torch.allclose(out_penultimate, out_last, atol=1e-2)
    # The pooled, projected feature is not what we return, but it comes from the same "last" states.
    pooled = out_last[torch.arange(len(ids)), ids.argmax(dim=1)] @ open_clip_model.text_projection
    torch.testing.assert_close(pooled, open_clip_model.encode_text(ids))


@torch.no_grad()
def test_open_clip_encoder_is_causal(open_clip_model, oc_tokenizer):
    encoder = OpenCLIPTextEncoder(open_clip_model, oc_tokenizer)
    ids = encoder.tokenize(CAPTIONS[:2])
    changed = ids.clone()
    changed[:, 5] = 1000
    a, b = encoder(ids), encoder(changed)
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])


def test_open_clip_encoder_errors(open_clip_model, oc_tokenizer):
    with pytest.raises(ValueError, match="layer"):
        OpenCLIPTextEncoder(open_clip_model, oc_tokenizer, layer="middle")
    encoder = OpenCLIPTextEncoder(open_clip_model, oc_tokenizer)
    with pytest.raises(TypeError, match="whole open_clip model"):
        save_open_clip_checkpoint(encoder, "unused.safetensors")


# ---------------------------------------------------------------- open_clip -> transformers


@pytest.mark.parametrize("quick_gelu", [False, True])
@pytest.mark.parametrize("layer", ["penultimate", "last"])
@torch.no_grad()
def test_open_clip_to_hf_matches(open_clip_model, oc_tokenizer, quick_gelu, layer):
    model = _tiny_open_clip(quick_gelu=True) if quick_gelu else open_clip_model
    encoder = OpenCLIPTextEncoder(model, oc_tokenizer, layer=layer)
    text_encoder, tokenizer = open_clip_to_hf(encoder)
    assert text_encoder.config.num_hidden_layers == (2 if layer == "penultimate" else 3)
    assert text_encoder.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    ids = _hf_ids(tokenizer, CAPTIONS)
    assert torch.equal(ids, encoder.tokenize(CAPTIONS))  # zero padding, like open_clip
    torch.testing.assert_close(text_encoder(ids).last_hidden_state, encoder(ids), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_converted_model_exports_in_diffusers_layout(open_clip_model, oc_tokenizer, tmp_path):
    encoder = OpenCLIPTextEncoder(open_clip_model, oc_tokenizer)
    text_encoder, tokenizer = open_clip_to_hf(encoder)
    text_encoder.save_pretrained(tmp_path / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    reloaded = hf_clip_text_encoder(tmp_path)
    assert reloaded.tokenizer.pad_token_id == 0
    torch.testing.assert_close(reloaded.encode(CAPTIONS), encoder.encode(CAPTIONS), atol=1e-5, rtol=1e-5)


def test_open_clip_to_hf_refuses_layer_scale(oc_tokenizer):
    text_cfg = dict(TINY["text_cfg"], ls_init_value=0.1)
    model = open_clip.create_model(ARCH, **dict(TINY, text_cfg=text_cfg))
    with pytest.raises(ValueError, match="layer scale"):
        open_clip_to_hf(OpenCLIPTextEncoder(model, oc_tokenizer))
