"""The system_prompt method: templates, named sets, ensembles, system text; validation errors."""

from __future__ import annotations

import pytest

import adaptkit
from adaptkit.errors import CompatibilityError, SpecError
from adaptkit.surface import TextSite
from adaptkit_plugins.methods.system_prompt import SystemPromptParams, fill, template_sets


def _spec(**method):
    return {
        "backbone": {"name": "clip"},
        "methods": [{"name": "system_prompt", **method}],
        "task": {"name": "zero_shot"},
        "data": {"name": "digits", "classes": [0, 1, 2]},
    }


def test_fill_accepts_every_placeholder():
    assert fill("a photo of a {label}.", "cat") == "a photo of a cat."
    assert fill("{text}, drawn", "cat") == "cat, drawn"
    assert fill("the {}", "cat") == "the cat"


def test_rewrite_single_ensemble_and_system_text():
    one = SystemPromptParams(templates=["a photo of a {label}."])
    assert one.rewrite("cat") == "a photo of a cat."
    many = SystemPromptParams(templates=["a {label}.", "the {label}."], system="pets:")
    assert many.rewrite("cat") == ["pets: a cat.", "pets: the cat."]
    suffix = SystemPromptParams(system="a type of pet.", system_position="suffix")
    assert suffix.rewrite("a cat,") == "a cat, a type of pet."


def test_named_sets_builtin_and_from_a_file(tmp_path):
    assert SystemPromptParams(templates="food").resolved_templates() == ["a photo of {label}, a type of food."]
    assert len(template_sets()["imagenet_ensemble7"]) == 7
    custom = tmp_path / "sets.yaml"
    custom.write_text("mine:\n  - 'a sketch of {label}.'\n  - 'a {label}, sketched.'\n")
    params = SystemPromptParams(templates="mine", template_file=str(custom))
    assert params.resolved_templates() == ["a sketch of {label}.", "a {label}, sketched."]


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ({"templates": "fod"}, "unknown template set 'fod' (did you mean 'food'?)"),
        ({"templates": ["a photo of a cat."]}, "has no placeholder"),
        ({"templates": "a photo of a {label}."}, "give a list"),
        ({"templates": []}, "at least one template"),
        ({}, "give templates, a system text, or both"),
        ({"templates": "mine", "template_file": "no/such/sets.yaml"}, "not found"),
        ({"template": ["a {label}"]}, "methods[0].template: unknown key (did you mean 'templates'?)"),
    ],
)
def test_bad_templates_are_spec_errors_with_their_path(method, message):
    with pytest.raises(SpecError) as info:
        adaptkit.load_spec(_spec(**method))
    assert message in str(info.value)
    assert "methods[0]" in str(info.value)


def test_text_site_expands_ensembles_and_apply_refuses_them():
    site = TextSite()
    site.add(SystemPromptParams(templates=["a {label}.", "the {label}."]).rewrite)
    site.add(lambda text: text.upper())
    assert site.expand("cat") == ["A CAT.", "THE CAT."]
    with pytest.raises(CompatibilityError, match="2 variants"):
        site.apply(["cat"])


def test_ensemble_is_the_mean_of_normalised_template_embeddings():
    import torch
    from adaptkit.builder import build

    templates = ["a photo of the digit {label}.", "a handwritten {label}.", "{label}"]
    model = build(_spec(templates=templates))
    assert model.adaptkit.methods[0].name == "system_prompt"
    assert not any(p.requires_grad for p in model.parameters())
    backbone = model.backbone
    with torch.no_grad():
        ensemble = backbone.encode_text(["7", "3"], normalize=True)
        singles = torch.nn.functional.normalize(backbone.encode_text(backbone._tokenize_raw(
            [fill(t, label) for label in ("7", "3") for t in templates])), dim=-1).reshape(2, 3, -1)
        expected = torch.nn.functional.normalize(singles.mean(dim=1), dim=-1)
    assert torch.allclose(ensemble, expected, atol=1e-6)


def test_templates_change_what_the_text_tower_sees():
    import torch
    from adaptkit.builder import build

    plain = build({**_spec(templates=["{label}"])}).backbone
    templated = build(_spec(templates=["a handwritten {label}."], system="digits:")).backbone
    assert templated.text_site.apply(["7"]) == ["digits: a handwritten 7."]
    with torch.no_grad():
        assert torch.equal(templated.tokenize(["7"]), plain.tokenize(["digits: a handwritten 7."]))
