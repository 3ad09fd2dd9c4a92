"""``model.source: timm/<name>``: built offline, clear errors, user files that import timm."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO_ROOT, cli, cli_env, one_error_line, sets

from smcp_core.errors import SmcpError
from smcp_core.models import build_model
from smcp_core.utils.tv import import_torchvision

import_torchvision()
pytest.importorskip("timm")


def test_timm_source_builds_offline_with_num_classes_and_kwargs():
    model = build_model("timm/resnet18", num_classes=7, kwargs={"in_chans": 1}).eval()
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 7)


def test_unknown_timm_model_suggests_close_names():
    with pytest.raises(SmcpError, match=r"unknown timm model 'resnet26e'; did you mean .*timm/resnet26d"):
        build_model("timm/resnet26e")


def test_weights_never_come_from_the_hub():
    with pytest.raises(SmcpError, match=r"model.kwargs.pretrained is not allowed: .*model.checkpoint"):
        build_model("timm/resnet18", kwargs={"pretrained": True})


def test_missing_timm_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(SmcpError, match=r"timm is not installed .*pip install 'smcp\[timm\]'"):
        build_model("timm/resnet18")


def test_a_training_form_checkpoint_loads_then_is_folded(tmp_path):
    """RepVGG: a checkpoint of the multi-branch training form; the built model is the folded
    (deployed) form with the same function."""
    from smcp_core.config.recipe import load_recipe
    from smcp_core.stages.builders import build_model as build_from_recipe

    train_form = build_model("timm/repvgg_a0", num_classes=10, deploy=False).eval()
    torch.save(train_form.state_dict(), tmp_path / "ck.pt")
    recipe = load_recipe("quickstart", ["model.source=timm/repvgg_a0", "model.kwargs={}",
                                        f"model.checkpoint={tmp_path / 'ck.pt'}", "data.source=synthetic"])
    deployed = build_from_recipe(recipe)
    assert all(m.reparam_conv is not None for m in deployed.modules() if hasattr(m, "reparam_conv"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(deployed(x), train_form(x), rtol=1e-4, atol=1e-5)


def test_kwargs_of_the_recipe_are_named_when_they_do_not_fit_an_overridden_source(tmp_path):
    code, _, err = cli("inspect", "quickstart", *sets(["model.source=timm/resnet18", "data.source=synthetic"]))
    line = one_error_line(err)
    assert code == 1 and "in_chans" not in line
    assert "model.kwargs {'in_channels': 1} are set in quickstart.yaml" in line and "--set 'model.kwargs={}'" in line


def test_a_user_file_importing_timm_builds_in_a_fresh_process(tmp_path):
    """The torchvision shim runs before the user's file imports timm (which imports torchvision)."""
    (tmp_path / "net.py").write_text(textwrap.dedent("""
        import timm

        def build(num_classes=10):
            return timm.create_model("resnet18", pretrained=False, num_classes=num_classes)
    """))
    code = (f"from smcp_core.models import build_model; "
            f"print(type(build_model({str(tmp_path / 'net.py:build')!r}, num_classes=3)).__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(),
                         cwd=REPO_ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ResNet"
