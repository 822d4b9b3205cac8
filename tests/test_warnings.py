"""Every warning netmend raises points at the user's line, whatever the call path.

A fixed ``stacklevel`` was right for one path only: the same warning raised under
``identify``, under ``repair`` (deeper) and under the wrapper that keeps the global RNG
pointed into ``api.py`` on most of them, so a user's warning filter by module or the file
shown in the message was useless (found by an outside-in trial).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import netmend
from netmend._warnings import warn

RUN = dict(progress=False, device="cpu")


def _caught(fn) -> list[warnings.WarningMessage]:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return list(caught)


def _three_failures(blobs, model):  # type: ignore[no-untyped-def]
    extra = torch.tensor([[-0.8, -0.7], [-1.0, -0.5]], dtype=torch.float64)
    Xf, yf = torch.cat([blobs.Xf, extra]), torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        assert (model(Xf).argmax(1) != yf).all()
    return Xf, yf


@pytest.mark.parametrize("call", ["identify", "repair"])
def test_warnings_point_at_the_callers_line(blobs, blobs_logreg, call):
    failures = _three_failures(blobs, blobs_logreg)
    fn = getattr(netmend, call)
    caught = _caught(lambda: fn(blobs_logreg, (blobs.X, blobs.y), failures, **RUN))
    few = [w for w in caught if "only 3 failure" in str(w.message)]
    assert len(few) == 1, [str(w.message) for w in caught]
    assert few[0].filename == __file__
    # every other warning of the call is attributed the same way
    assert {w.filename for w in caught} == {__file__}


def test_treatment_and_precision_warnings_point_at_the_callers_line(blobs, blobs_logreg):
    causes = [0, 1, 2]
    caught = _caught(
        lambda: netmend.treat(blobs_logreg, (blobs.X, blobs.y), causes, "newton", l2=1e-2, **RUN)
    )
    assert any("research-only" in str(w.message) for w in caught)
    half = blobs_logreg.to(torch.bfloat16)
    caught += _caught(
        lambda: netmend.treat(half, (blobs.X.float(), blobs.y), causes, "finetune", **RUN)
    )
    assert any("bfloat16" in str(w.message) for w in caught)
    assert {w.filename for w in caught} == {__file__}


def test_warn_from_outside_the_package_points_at_its_caller():
    caught = _caught(lambda: warn("plain"))
    assert len(caught) == 1 and caught[0].filename == __file__
    assert caught[0].category is UserWarning


def test_forward_mode_passes_do_not_raise_torchs_jit_deprecation():
    """torch loads its forward-mode rules with the deprecated ``torch.jit.script`` on the first
    Jacobian-vector product; under ``-W error::DeprecationWarning`` that made netmend's first
    ``linear`` / GGN / Hessian pass fail inside torch (found by an outside-in trial). A fresh
    interpreter, because the rules load once per process."""
    import subprocess
    import sys

    probe = (
        "import torch, netmend\n"
        "g = torch.Generator().manual_seed(0)\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 3))\n"
        "X, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)\n"
        "with torch.no_grad():\n"
        "    yq = (m(X[:3]).argmax(1) + 1) % 3\n"
        "for kw in ({}, {'curvature': 'ggn'}):\n"
        "    netmend.identify(m, (X, y), (X[:3], yq), 'linear', k=3, progress=False, **kw)\n"
        "print('done')\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", probe],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr[-2000:]
