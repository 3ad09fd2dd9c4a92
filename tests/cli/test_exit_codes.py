"""Exit codes of issue 17: no tracebacks, no exit 3 for bad input, SIGTERM like Ctrl-C.

0 ok, 1 bad input (one line ``error: ...``), 2 gate failed, 3 internal error only, 130 SIGINT,
141 broken stdout pipe (quiet), 143 SIGTERM (README "Exit codes")."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import TINY, cli, one_error_line, sets
from conftest import cli_env as env

from smcp_core.errors import GateFailed
from smcp_core.utils.fsutil import load_torch, run_lock

TINY_SETS = sets(TINY)


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("SMCP_DEBUG", raising=False)


# ------------------------------------------------------------------------ 1: SystemExit, broken pipe


def test_sys_exit_at_import_of_user_model_is_bad_input(tmp_path):
    f = tmp_path / "exits.py"
    f.write_text("import sys\n\nsys.exit(3)\n")
    code, out, err = cli("inspect", f"{f}:build")
    assert code == 1, err
    line = one_error_line(err)
    assert f"{f}:3" in line and "sys.exit" in line
    code, out, err = cli("inspect", f"{f}:build", "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["ok"] is False and doc["kind"] == "input" and doc["exit_code"] == 1 and str(f) in doc["error"]


def test_sys_exit_while_building_user_model_is_bad_input(tmp_path):
    f = tmp_path / "builder.py"
    f.write_text("import sys\n\n\ndef build(num_classes=10):\n    sys.exit(0)\n")
    code, out, err = cli("inspect", f"{f}:build")
    assert code == 1, err
    assert f"{f}:5" in one_error_line(err)


def test_broken_stdout_pipe_is_quiet():
    p = subprocess.Popen([sys.executable, "-m", "smcp_cli", "--help"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env())
    p.stdout.close()  # the reader is gone before smcp writes (as with `smcp --help | head -c 20`)
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "Traceback" not in err and "Error" not in err, err
    assert err == ""
    assert p.returncode == 141


# ------------------------------------------------------------------------------------- 2: SIGTERM


def test_sigterm_during_prune(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "smcp_cli", "prune", "--out", str(out), *TINY_SETS,
            "--set", "prune.epochs=60", "--set", "prune.cooldown_epochs=57", "--quiet", "--json"]
    p = subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not (out / "prune" / "metrics.csv").exists():  # training has started
            assert p.poll() is None, p.communicate()[1][-2000:]
            assert time.monotonic() - t0 < 240, "training never started"
            time.sleep(0.02)
        assert p.poll() is None, "the run finished before SIGTERM"
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, (p.returncode, stderr[-2000:])
    assert "interrupt" in one_error_line(stderr)
    doc = json.loads(stdout)
    assert doc["ok"] is False and doc["kind"] == "interrupted" and doc["exit_code"] == 143 and doc["error"]
    # the lock is released and what was written is intact (the checkpoint of the last epoch)
    assert not (out / ".smcp.lock.info").exists()
    with run_lock(out, "test"):
        pass
    assert not list(out.rglob(".*.tmp"))
    if (out / "prune" / "checkpoint.pt").exists():
        load_torch(out / "prune" / "checkpoint.pt", "checkpoint")


# ------------------------------------------------------------------ 3: bad places, out of memory


def test_out_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    code, _, err = cli("prune", "--out", f, *TINY_SETS, "-q")
    assert code == 1, err
    assert "is a file" in one_error_line(err) and "--out" in err
    code, _, err = cli("prune", "--out", f / "sub", *TINY_SETS, "-q")
    assert code == 1, err
    assert str(f) in one_error_line(err) and "is a file" in err


def test_out_read_only(tmp_path, monkeypatch):
    target = tmp_path / "ro" / "run"
    real_mkdir = os.mkdir

    def mkdir(path, *a, **kw):  # root ignores chmod: simulate a read-only file system
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)
    code, out, err = cli("prune", "--out", target, *TINY_SETS, "-q", "--json")
    assert code == 1, err
    assert "writable" in one_error_line(err)
    assert json.loads(out)["exit_code"] == 1


def test_read_only_write_inside_a_command_is_bad_input(tmp_path, monkeypatch):
    """An atomic write failing with EACCES/EROFS/ENOSPC somewhere in a stage: exit 1, not 3."""
    from smcp_core import stages

    def boom(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "recipe.resolved.yaml"))

    monkeypatch.setattr(stages, "write_resolved", boom)
    code, _, err = cli("prune", "--out", tmp_path / "run", *TINY_SETS, "-q")
    assert code == 1, err
    line = one_error_line(err)
    assert "recipe.resolved.yaml" in line and "disk space" in line


def test_lock_symlink_loop(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / ".smcp.lock").symlink_to(".smcp.lock")
    code, _, err = cli("prune", "--out", d, *TINY_SETS, "-q")
    assert code == 1, err
    assert ".smcp.lock" in one_error_line(err) and "symbolic link" in err


def test_name_too_long(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    long = "n" * 300
    code, _, err = cli("prune", "--set", f"name={long}", *TINY_SETS, "-q")
    assert code == 1, err
    assert "too long" in one_error_line(err) and "name" in err
    assert not (tmp_path / "runs").exists()  # no empty runs/ left behind
    code, _, err = cli("prune", "--out", Path("runs") / "deeper" / long, *TINY_SETS, "-q")
    assert code == 1, err
    assert "too long" in one_error_line(err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("exc", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 858993459200 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_out_of_memory_names_the_setting(tmp_path, monkeypatch, exc):
    from smcp_core import stages

    def boom(*a, **kw):
        raise exc

    monkeypatch.setattr(stages, "prune", boom)
    code, out, err = cli("prune", "--out", tmp_path / "run", *TINY_SETS, "-q", "--json")
    assert code == 1, err
    line = one_error_line(err)
    assert "memory" in line and "data.batch_size" in line
    assert json.loads(out)["kind"] == "input"


# ------------------------------------------------------------------------------------- 4: messages


class _FakeExport:
    def to_dict(self) -> dict:
        return {"passed": False, "speedup": 1.1, "target": {"kind": "speedup", "value": 2.0}}


def test_gate_failure_json_document(tmp_path, monkeypatch):
    from smcp_core import stages

    monkeypatch.setattr(stages, "export", lambda *a, **kw: _FakeExport())

    def gate(result):
        raise GateFailed("measured speed-up 1.10x is below the target 2x")

    monkeypatch.setattr(stages, "gate", gate)
    code, out, err = cli("export", "--out", tmp_path / "run", *TINY_SETS, "-q", "--json")
    assert code == 2, err
    assert "below the target" in one_error_line(err)
    doc = json.loads(out)  # one document
    assert doc["ok"] is False and doc["kind"] == "gate" and doc["exit_code"] == 2
    assert "below the target" in doc["error"]
    assert doc["speedup"] == 1.1  # the result's fields are kept


def test_error_after_progress_has_no_leading_empty_line(tmp_path):
    code, _, err = cli("prune", "--out", tmp_path / "run", *TINY_SETS, "--set", "prune.target.flops_ratio=0.0001")
    assert code == 1, err
    assert err.startswith("error: "), repr(err[:200])
    one_error_line(err)


def test_torch_user_warnings_are_filtered(tmp_path):
    f = tmp_path / "warns.py"
    f.write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "def build(num_classes=2):\n"
        "    torch.tensor(torch.zeros(1))  # torch: UserWarning 'To copy construct from a tensor...'\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(4, num_classes))\n"
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, out, err = cli("inspect", f"{f}:build", "--input-size", "3,8,8", "--num-classes", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["ok"] is True
    assert not [w for w in seen if issubclass(w.category, UserWarning)], [str(w.message) for w in seen]
    assert "UserWarning" not in err
