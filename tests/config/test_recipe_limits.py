"""Recipe limits (issue 17): size, nesting depth, alias expansion, non-regular files; YAML merge keys;
the direction of the "relax the target" hint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import cli, tiny_recipe

from smcp_core import stages
from smcp_core.config.recipe import (
    MAX_DEPTH,
    MAX_NODES,
    MAX_RECIPE_BYTES,
    Recipe,
    TargetConfig,
    load_recipe,
)
from smcp_core.errors import InfeasibleTarget, SmcpError


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def one_line_error(spec: str, overrides=()) -> str:
    with pytest.raises(SmcpError) as info:
        load_recipe(spec, list(overrides), env={})
    msg = str(info.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)
    return msg


def alias_bomb(levels: int, width: int = 10, indent: str = "    ") -> str:
    """``a0: &a0 [x, ...]`` then ``aN: &aN [*aN-1, ...]``: width**levels values once expanded."""
    lines = [f"{indent}a0: &a0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"{indent}a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_limits_are_sane():
    assert MAX_RECIPE_BYTES == 1 << 20
    assert 10 <= MAX_DEPTH <= 1000
    assert MAX_NODES == 100_000


def test_file_over_size_limit_is_one_line(tmp_path):
    path = write(tmp_path, "prune:\n  epochs: 3\n" + "#" * MAX_RECIPE_BYTES + "\n")
    msg = one_line_error(path)
    assert "over the limit" in msg and "1 MiB" in msg and "r.yaml" in msg, msg


def test_file_just_under_size_limit_loads(tmp_path):
    head = "prune:\n  epochs: 30\n"
    path = write(tmp_path, head + "#" * (MAX_RECIPE_BYTES - len(head) - 2) + "\n")
    assert load_recipe(path, env={}).prune.epochs == 30


def test_alias_bomb_refused_before_expansion(tmp_path):
    # 10**6 values once expanded (a valid recipe otherwise: model.kwargs is free-form)
    path = write(tmp_path, "model:\n  kwargs:\n" + alias_bomb(6))
    msg = one_line_error(path)
    assert "aliases" in msg and f"{MAX_NODES:,}" in msg, msg


def test_big_alias_bomb_is_quick(tmp_path):
    # 10**12 values: counted on the node graph, never built
    path = write(tmp_path, "model:\n  kwargs:\n" + alias_bomb(12))
    assert "aliases" in one_line_error(path)


def test_alias_bomb_in_set_value():
    bomb = "{" + alias_bomb(6, indent="").replace("\n", ", ").rstrip(", ") + "}"
    msg = one_line_error("quickstart", [f"model.kwargs={bomb}"])
    assert "--set model.kwargs=" in msg and "aliases" in msg, msg


def test_small_aliases_still_work(tmp_path):
    path = write(tmp_path, "model:\n  kwargs:\n" + alias_bomb(3))
    assert len(load_recipe(path, env={}).model.kwargs["a2"]) == 10


def test_nesting_depth_limit(tmp_path):
    n = MAX_DEPTH + 5
    path = write(tmp_path, "model:\n  kwargs:\n    x: " + "[" * n + "]" * n + "\n")
    msg = one_line_error(path)
    assert "nested" in msg and str(MAX_DEPTH) in msg, msg


def test_recursive_alias_keeps_its_message(tmp_path):
    msg = one_line_error(write(tmp_path, "model:\n  kwargs:\n    a: &a [*a]\n"))
    assert "refers to itself" in msg, msg


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_recipe_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    msg = one_line_error(str(fifo))
    assert "is not a regular file" in msg and "r.yaml" in msg, msg


def test_merge_key_with_override(tmp_path):
    path = write(tmp_path, (
        "prune:\n"
        "  optimizer: &opt\n"
        "    lr: 0.05\n"
        "    momentum: 0.8\n"
        "  <<: {epochs: 10, warmup_epochs: 2}\n"
        "  epochs: 12\n"
        "model:\n"
        "  kwargs:\n"
        "    <<: [*opt, {lr: 0.5, extra: 1}]\n"
        "    momentum: 0.7\n"
    ))
    r = load_recipe(path, env={})
    assert r.prune.epochs == 12 and r.prune.warmup_epochs == 2
    assert r.prune.optimizer.lr == 0.05
    # explicit keys override merged ones; earlier merged mappings override later ones
    assert r.model.kwargs == {"lr": 0.05, "momentum": 0.7, "extra": 1}


def test_explicit_duplicate_still_refused_next_to_merge(tmp_path):
    path = write(tmp_path, "prune:\n  <<: {epochs: 10}\n  epochs: 12\n  epochs: 13\n")
    msg = one_line_error(path)
    assert "duplicate key 'epochs'" in msg and "line 4" in msg, msg


@pytest.mark.parametrize("kind, value, hint", [
    ("speedup", 3.0, "lower the target"),
    ("latency_ms", 1.0, "raise the target"),
    ("flops_ratio", 0.1, "raise the target"),
])
def test_relax_hint_direction(kind, value, hint):
    r = load_recipe("quickstart", [f"prune.target.{kind}={value}"], env={})
    assert r.relax_hint() == hint
    assert r.prune.target.relax_hint() == hint
    assert Recipe.relax_hint_for(kind) == hint == TargetConfig.relax_hint_for(kind)


def test_unreachable_flops_target_says_raise(tmp_path):
    with pytest.raises(InfeasibleTarget) as info:
        stages.prune(tiny_recipe("prune.target.flops_ratio=0.001"), tmp_path)
    msg = str(info.value)
    assert "out of reach" in msg and "raise the target" in msg and "lower the target" not in msg, msg


@pytest.mark.parametrize("case", ["bomb", "big", "fifo"])
def test_cli_exit_1_one_line(tmp_path, case):
    path = tmp_path / "r.yaml"
    if case == "bomb":
        path.write_text("model:\n  kwargs:\n" + alias_bomb(12))
    elif case == "big":
        path.write_text("#" * (MAX_RECIPE_BYTES + 1))
    elif hasattr(os, "mkfifo"):
        os.mkfifo(path)
    else:
        pytest.skip("needs os.mkfifo")
    code, out, err = cli("inspect", path)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, (code, out, err)
    assert {"bomb": "aliases", "big": "1 MiB", "fifo": "not a regular file"}[case] in lines[0], lines
