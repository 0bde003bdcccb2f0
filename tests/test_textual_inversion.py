"""Textual inversion: method ``prompt`` with ``placeholder`` on a CLIP text tower (PlaceholderSite)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import adaptkit
from adaptkit.errors import AdaptkitError, CompatibilityError
from adaptkit.surface import PlaceholderSite, Surface, TokenSite, Tower
from adaptkit_plugins.diffusion.tiny_pipeline import clip_tokenizer, preset_config, tiny_components
from adaptkit_plugins.methods._prompt_impl import apply
from adaptkit_plugins.methods.prompt import PromptParams, placeholder_embeddings, write_learned_embeds

WORD, START = "<my-digit>", "seven"


def spec(tmp_path, method=None, task=None, **train):
    return {
        "name": "ti", "seed": 0,
        "backbone": {"name": "ddpm_unet", "model": "ddpm_unet_cross_tiny", "conditioning": "text",
                     "text_encoder": {"model": "clip_tiny_digits"}},
        "methods": [{"name": "prompt", "tower": "text", "placeholder": WORD, "initializer_token": START, **(method or {})}],
        "task": {"name": "text_to_image", "instance_prompt": f"a handwritten {WORD}", "condition_dropout": 0.0,
                 "preview": 0, "steps": 2, **(task or {})},
        "data": {"name": "digits", "classes": [7, 1]},
        "train": {"max_steps": 2, "batch_size": 8, "lr": 0.1, **train},
        "output": {"dir": str(tmp_path / "run")},
    }


def clip_of(model):
    return model.backbone.text.encoder


def states(model, texts):
    return clip_of(model).encode_text_tokens(texts)[1]


def test_the_clip_text_site_is_a_placeholder_site_and_knows_its_vocabulary(tmp_path):
    site = clip_of(adaptkit.build(spec(tmp_path))).text_tokens
    assert isinstance(site, PlaceholderSite)
    assert site.in_vocabulary("seven") and not site.in_vocabulary(WORD) and not site.in_vocabulary("sevenish")


@torch.no_grad()
def test_the_placeholder_starts_as_the_initializer_word_wherever_it_occurs(tmp_path):
    model = adaptkit.build(spec(tmp_path)).eval()
    texts = [f"a photo of {WORD}.", f"{WORD}{WORD}, a {WORD}", "no placeholder here"]
    plain = [t.replace(WORD, f" {START} ") for t in texts]
    assert torch.equal(states(model, texts), states(model, plain))
    ids = clip_of(model)._tokenize_raw(texts[:1])[0]
    assert (ids < 0).sum() == 1  # one token for the whole word
    # the word changes the encoding once its vector does
    (vector,) = [p for p in model.parameters() if p.requires_grad]
    vector.add_(1.0)
    assert not torch.allclose(states(model, texts[:1]), states(model, plain[:1]))
    assert torch.equal(states(model, texts[2:]), states(model, plain[2:]))


def test_training_updates_only_the_placeholder_vector(tmp_path):
    model = adaptkit.build(spec(tmp_path), keep_data=True)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert list(trainable) == ["placeholder_text.vector"] and trainable["placeholder_text.vector"].shape == (64,)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(trainable.values(), lr=1.0)
    model.training_step(model.adaptkit.data.train.batch(range(8))).loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {"placeholder_text.vector"}
    table = clip_of(model).net.token_embedding.weight
    assert torch.equal(table, before["backbone.text.encoder.net.token_embedding.weight"])


def test_a_saved_run_loads_with_its_learned_word(tmp_path):
    result = adaptkit.run(spec(tmp_path))
    loaded = adaptkit.load_trained(result.output_dir).eval()
    learned = placeholder_embeddings(loaded)
    assert list(learned) == [WORD] and learned[WORD].shape == (1, 64)
    start = clip_of(loaded).text_tokens.embed_words(START)
    assert not torch.allclose(learned[WORD], start)  # it trained
    torch.testing.assert_close(learned[WORD], placeholder_embeddings(result.model)[WORD])
    with torch.no_grad():
        torch.testing.assert_close(states(loaded, [f"a {WORD}"]), states(result.model.eval(), [f"a {WORD}"]))


def test_a_word_the_tokenizer_has_is_refused_by_name(tmp_path):
    with pytest.raises(CompatibilityError, match="placeholder 'seven' is already a token in the vocabulary of tower 'text' of backbone 'ddpm_unet'"):
        adaptkit.build(spec(tmp_path, method={"placeholder": "seven"}))


def test_an_initializer_of_several_tokens_is_refused(tmp_path):
    with pytest.raises(CompatibilityError, match=r"initializer_token 'sevenish' is 2 tokens"):
        adaptkit.build(spec(tmp_path, method={"initializer_token": "sevenish"}))


@pytest.mark.parametrize(("method", "message"), [
    ({"initializer_token": None}, "needs both placeholder"),
    ({"count": 2}, "count belongs to soft prompts"),
    ({"placeholder": "my digit"}, "one word without spaces"),
    ({"tower": "unet"}, "placeholder needs text towers, but tower 'unet' reads images"),
])
def test_bad_textual_inversion_options_fail_validation(tmp_path, method, message):
    with pytest.raises(AdaptkitError, match=message):  # validation: a spec or compatibility error
        adaptkit.build(spec(tmp_path, method=method))


def test_a_text_tower_that_cannot_learn_words_says_so():
    surface = Surface("fake", {"text": Tower("text", 8, modality="text", tokens=TokenSite())}, root=torch.nn.Module())
    with pytest.raises(CompatibilityError, match="tower 'text' of backbone 'fake' cannot"):
        apply(PromptParams(tower="text", placeholder=WORD, initializer_token=START), surface)


def test_captions_without_the_placeholder_warn_once(tmp_path):
    model = adaptkit.build(spec(tmp_path, task={"instance_prompt": "a handwritten digit"}), keep_data=True)
    batch = model.adaptkit.data.train.batch(range(4))
    with pytest.warns(UserWarning, match="no caption of this training batch contains the placeholder '<my-digit>'"):
        model.training_step(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.training_step(batch)


def test_textual_inversion_combines_with_dreambooth_prior_preservation(tmp_path):
    task = {"prior_preservation": True, "class_prompt": "a handwritten digit", "num_class_images": 2}
    model = adaptkit.build(spec(tmp_path, task=task), keep_data=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the class prompt lacks the word, the instance prompt has it: no warning
        model.training_step(model.adaptkit.data.train.batch(range(4))).loss.backward()
    (vector,) = [p for p in model.parameters() if p.requires_grad]
    assert vector.grad is not None and vector.grad.abs().sum() > 0


def tiny_sd_pipeline(hidden: int) -> Any:
    """diffusers' StableDiffusionPipeline of the sd_tiny components, its text encoder as wide as the
    clip text tower (its tokenizer is OpenAI CLIP's, written from open_clip's BPE file)."""
    from diffusers import StableDiffusionPipeline

    config = preset_config()
    config["text"] = {**config["text"], "hidden_size": hidden, "intermediate_size": 2 * hidden, "max_position_embeddings": 77}
    return StableDiffusionPipeline(**tiny_components(config), tokenizer=clip_tokenizer(77), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def test_the_learned_embeds_file_loads_into_diffusers(tmp_path):
    model = adaptkit.build(spec(tmp_path))
    (vector,) = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        vector.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    (file,) = write_learned_embeds(model, tmp_path / "embeds")
    assert file.name == "learned_embeds.safetensors"
    pipe = tiny_sd_pipeline(hidden=64)
    pipe.load_textual_inversion(str(file.parent))
    token = pipe.tokenizer.convert_tokens_to_ids(WORD)
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[token], vector.detach())
    # the two tokenizers split a text around the word alike
    text = f"a photo of {WORD}, twice:{WORD}."
    theirs = pipe.tokenizer([text], return_tensors="pt").input_ids[0]
    ours = clip_of(model)._tokenize_raw([text])[0][: len(theirs)]
    assert torch.equal(torch.where(ours == -1, token, ours), theirs)
