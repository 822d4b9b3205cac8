"""Research-only treatments: still callable, listed apart, and warned about with the reason."""

import pytest
import torch

import netmend
from netmend import treatment


def test_deletion_treatments_are_research_only_and_say_why():
    marked = treatment.research_only()
    assert set(marked) == {"newton", "ewc"}
    assert all("98.8%" in why and "demo_seeds.json" in why for why in marked.values())
    assert set(treatment.available()) - set(treatment.available(research=False)) == set(marked)
    assert "finetune" in treatment.available(research=False)


def test_a_research_only_treatment_runs_with_a_warning(blobs, blobs_logreg):
    X, y = blobs.X, blobs.y
    with pytest.warns(UserWarning, match="research-only"):
        out = netmend.treat(blobs_logreg, (X, y), [0, 1, 2], "newton", progress=False,
                            device="cpu")  # fmt: skip
    assert isinstance(out, torch.nn.Module)


def test_registering_a_research_only_plugin_lists_it_only_when_asked():
    from netmend._registry import Registry

    reg: Registry = Registry("thing")
    reg.register("plain", ())(lambda: None)
    reg.register("odd", (), research="measured to fail")(lambda: None)
    assert reg.available() == ["odd", "plain"]
    assert reg.available(research=False) == ["plain"]
    assert reg.research_only() == {"odd": "measured to fail"}
