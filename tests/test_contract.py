"""Contract tests: every registered backbone x every registered method.

Parametrised over the registry (``adaptkit.testing.contract_tests``), so a backbone or
method that registers later is tested the moment it does: one training step changes
only what the method owns, the trainable count matches the method's formula, save ->
fresh build -> load reproduces outputs, merged equals unmerged, identity at
initialisation where promised. A pair is skipped only where the static check says the
combination cannot work, after checking that its message names the method, the
backbone and the missing site.
"""

from __future__ import annotations

import pytest

from adaptkit.testing import assert_clear, contract_tests

globals().update(contract_tests())


def test_contract_pairs_cover_every_registered_backbone_and_method():
    import adaptkit

    reg = adaptkit.registry()
    pairs = contract_tests()["test_merged_equals_unmerged"].pytestmark[0].args[1]
    assert {(p.values[0].name, p.values[1].name) for p in pairs} == {
        (b, m) for b in reg.names("backbone") for m in reg.names("method")
    }
    named = contract_tests(methods=["prompt"])["test_merged_equals_unmerged"].pytestmark[0].args[1]
    assert {p.values[1].name for p in named} == {"prompt"}
    with pytest.raises(ValueError, match="no registered method nope"):
        contract_tests(methods=["nope"])


def test_a_vague_incompatibility_message_fails_the_contract():
    with pytest.raises(AssertionError):
        assert_clear(["prompt does not work here"], "swin", ["prompt"])
    assert_clear(["method 'prompt' needs tokens sites, but backbone 'swin' has none"], "swin", ["prompt"])
