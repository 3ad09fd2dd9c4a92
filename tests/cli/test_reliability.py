"""A tool people trust in CI: SIGKILL + --resume, run-directory lock, NaN loss, corrupt artifacts,
generated bad input (hypothesis), --json/--quiet on every command, metrics.csv.

Most commands run in this process (``smcp_cli.app.main``) to save the interpreter start-up; the
kill test needs real processes."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, cli, one_error_line, sets, snapshot
from conftest import cli_env as env

from smcp_core.utils.fsutil import CHECKSUMS, load_torch, run_lock, verify_artifact

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_single_thread):
    yield


def temp_files(d: Path) -> list[Path]:
    return [p for p in d.rglob(".*.tmp")]


def verify_manifests(d: Path) -> int:
    """Every file listed in a SHA256SUMS under ``d`` matches it; returns how many were checked.

    A record without its file is allowed: a process killed between recording the digest of a
    file's first version and renaming it into place leaves one (readers ignore it)."""
    n = 0
    for man in d.rglob(CHECKSUMS):
        for name in {line.partition("  ")[2] for line in man.read_text().splitlines()}:
            f = man.parent / name
            if f.exists():
                verify_artifact(f, name)
                n += 1
    return n


# --------------------------------------------------------------------------------------------------
# a tiny but complete run (profile -> prune -> slim -> export): the session fixture ``tiny_run`` of
# tests/conftest.py (built once, shared with test_hostile_inputs.py)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_every_artifact_has_a_checksum_and_metrics_csv_has_one_row_per_epoch(tiny_run):
    listed = {(m.parent.name if m.parent != tiny_run else "") + "/" + l.split("  ")[1]
              for m in tiny_run.rglob(CHECKSUMS) for l in m.read_text().splitlines()}
    for f in ("/latency.json", "prune/checkpoint.pt", "prune/pruned.pt", "prune/summary.json", "prune/metrics.csv",
              "slim/weights.pt", "slim/channel_spec.json", "slim/model.pt2", "slim/slim.json",
              "export/model.onnx", "export/baseline.onnx", "export/report.json"):
        assert f in listed, f
    assert verify_manifests(tiny_run) == len(listed)
    assert temp_files(tiny_run) == []
    rows = list(csv.DictReader((tiny_run / "prune" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(r["unit"] == "ms" and float(r["predicted"]) > 0 and float(r["budget_predicted"]) > 0 for r in rows)
    assert all(0 <= float(r["train_top1"]) <= 100 and 0 <= float(r["val_top1"]) <= 100 for r in rows)
    assert int(rows[-1]["kept_channels"]) < int(rows[-1]["total_channels"]) == int(rows[0]["kept_channels"])
    summary = json.loads((tiny_run / "prune" / "summary.json").read_text())
    assert float(rows[-1]["predicted"]) == pytest.approx(summary["predicted_ms"], rel=1e-6)


# --------------------------------------------------------------------------------------------------
# --json and --quiet on every command


def test_every_command_has_json_and_quiet():
    import typer

    from smcp_cli.app import app

    group = typer.main.get_command(app)
    names = sorted(group.commands)
    assert names == ["compare", "export", "inspect", "profile", "prune", "report", "run", "slim"]
    for name in names:
        opts = {o for p in group.commands[name].params for o in p.opts}
        assert {"--json", "--quiet"} <= opts, name


def test_json_documents_and_quiet(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    # run again: every stage is up to date (its artifacts verified), one JSON document on stdout
    code, out, err = cli("run", "--out", run, *sets(TINY_RUN), "--json", "--quiet")
    assert code in (0, 2), err
    doc = json.loads(out)
    assert doc["stages"] == {s: "skipped" for s in ("profile", "prune", "slim", "export")}
    assert doc["ok"] == doc["report"]["passed"] == (code == 0)
    code, out, err = cli("slim", "--out", run, *sets(TINY_RUN), "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out)["ok"] is True
    code, out, err = cli("report", run, "--json", "--quiet")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ok"] is True and doc["skipped"] == [] and doc["epochs"] == 3
    assert {p["name"] for p in doc["latency_points"]} >= {"baseline", "uniform75", "uniform50", "pruned"}
    assert doc["artifacts_checked"] >= 12
    for name in ("channels.png", "training.png", "latency.png", "report.md", "report.html"):
        assert (run / "report" / name).stat().st_size > 1000, name
    code, out, err = cli("inspect", "cifar/resnet20", "--json", "--quiet")
    assert code == 0 and json.loads(out)["ok"] is True and len(json.loads(out)["groups"]) == 11
    code, out, err = cli("inspect", "cifar/resnet20", "--quiet")
    assert code == 0 and out == "" and err == ""
    # usage errors with --json: one line on stderr and the error document on stdout
    code, out, err = cli("prune", "--frobnicate", "--json")
    assert code == 1 and "No such option" in one_error_line(err)
    assert json.loads(out) == {"ok": False, "error": one_error_line(err)[len("error: "):], "kind": "usage",
                               "exit_code": 1}


# --------------------------------------------------------------------------------------------------
# corrupt or truncated artifacts: exit 1, one line, the file left as it was


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _digit(p: Path) -> None:
    """Change one digit: still valid JSON, only the checksum can tell."""
    data = bytearray(p.read_bytes())
    i = next(i for i in range(len(data) // 2, len(data)) if chr(data[i]).isdigit())
    data[i] = ord("7") if data[i] != ord("7") else ord("3")
    p.write_bytes(bytes(data))


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _unlisted(p: Path) -> None:
    """Remove the file's checksum record: only the structural check (parse, zip CRC) is left."""
    man = p.parent / CHECKSUMS
    man.write_text("".join(l + "\n" for l in man.read_text().splitlines() if not l.endswith("  " + p.name)))


# (file, damage, command, what the error line must name)
CORRUPT = {
    "latency table truncated / profile": ("latency.json", [_truncate], ["profile"], "latency.json"),
    "latency table digit / prune": ("latency.json", [_digit], ["prune"], "SHA256SUMS"),
    "latency table truncated, unlisted / prune": ("latency.json", [_unlisted, _truncate], ["prune"], "not valid JSON"),
    "checkpoint truncated / prune --resume": ("prune/checkpoint.pt", [_truncate], ["prune", "--resume"],
                                              "checkpoint.pt"),
    "checkpoint flipped / prune --resume": ("prune/checkpoint.pt", [_flip], ["prune", "--resume"], "SHA256SUMS"),
    "checkpoint truncated, unlisted / prune --resume": ("prune/checkpoint.pt", [_unlisted, _truncate],
                                                        ["prune", "--resume"], "truncated or corrupt"),
    "checkpoint empty, unlisted / prune --resume": ("prune/checkpoint.pt", [_unlisted, _empty],
                                                    ["prune", "--resume"], "truncated or corrupt"),
    "pruned.pt flipped / slim": ("prune/pruned.pt", [_flip], ["slim"], "pruned.pt"),
    "pruned.pt truncated, unlisted / slim": ("prune/pruned.pt", [_unlisted, _truncate], ["slim"], "truncated"),
    "summary truncated / run": ("prune/summary.json", [_truncate], ["run"], "summary.json"),
    "slim weights truncated / export": ("slim/weights.pt", [_truncate], ["export"], "weights.pt"),
    "slim weights flipped / export": ("slim/weights.pt", [_flip], ["export"], "SHA256SUMS"),
    "slim weights truncated, unlisted / export": ("slim/weights.pt", [_unlisted, _truncate], ["export"], "truncated"),
    "channel spec digit / export": ("slim/channel_spec.json", [_digit], ["export"], "channel_spec.json"),
    "torch.export program truncated / run": ("slim/model.pt2", [_truncate], ["run"], "model.pt2"),
    "ONNX truncated / run": ("export/model.onnx", [_truncate], ["run"], "model.onnx"),
    "ONNX truncated, unlisted / run": ("export/model.onnx", [_unlisted, _truncate], ["run"], "truncated or corrupt"),
    "ONNX flipped / report": ("export/baseline.onnx", [_flip], ["report"], "baseline.onnx"),
    "metrics.csv truncated / report": ("prune/metrics.csv", [_truncate], ["report"], "metrics.csv"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_artifact_is_detected_and_left_alone(tiny_run, tmp_path, case):
    rel, damage, command, expect = CORRUPT[case]
    run = copy_run(tiny_run, tmp_path / "run")
    f = run / rel
    for d in damage:
        d(f)
    before = snapshot(run)
    argv = [*command, run] if command == ["report"] else [*command, "--out", run, *sets(TINY_RUN)]
    argv.append("--quiet")  # progress logs (e.g. "profile: up to date") would precede the error line
    code, out, err = cli(*argv)
    assert code == 1, (code, err[-2000:])
    line = one_error_line(err)
    assert expect in line, line
    assert out == ""
    after = snapshot(run)
    assert after.get(rel) == before[rel]  # never overwritten
    # nothing else was touched either (only the resolved recipe is rewritten by every command)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed <= {"recipe.resolved.yaml"}, changed


# --------------------------------------------------------------------------------------------------
# NaN/Inf loss: one line, exit 1, the last good checkpoint untouched

NAN_SETS = [
    "data.train_subset=128", "data.val_subset=64", "data.batch_size=32", "prune.epochs=2",
    "prune.warmup_epochs=1", "prune.ramp_epochs=0", "prune.cooldown_epochs=1", "prune.max_steps=2",
    "prune.target.flops_ratio=0.6",
]


@pytest.mark.parametrize("case", ["loss", "weights"])
def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, case):
    """loss: an absurd learning rate, the loss of the next step is nan; weights: the last step of an
    epoch makes a weight inf (no later loss to see it): the end-of-epoch check catches it.  The run
    is interrupted after epoch 2 of 4 and resumed with the same recipe (only the learning rate,
    which --resume may change, differs in the loss case)."""
    from smcp_core.prune.trainer import PruneTrainer

    run = tmp_path / "run"
    recipe = NAN_SETS + ["prune.epochs=4", "prune.cooldown_epochs=3"]
    if case == "weights":
        recipe = [s for s in recipe if not s.startswith("prune.max_steps=")] + ["prune.max_steps=1"]
    train_epoch = PruneTrainer.train_epoch

    def interrupt_at_epoch_3(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return train_epoch(self, epoch)

    with monkeypatch.context() as mp:
        mp.setattr(PruneTrainer, "train_epoch", interrupt_at_epoch_3)
        code, out, err = cli("prune", "--out", run, *sets(recipe), "--quiet")
    assert code == 130, err
    before = snapshot(run / "prune")
    diverge = list(recipe)
    if case == "loss":  # resume for the two remaining epochs: the weights overflow at the first step
        diverge += ["prune.optimizer.lr=1e38"]
        expect = "loss became nan"
    else:
        expect = "weights became non-finite"
        step = torch.optim.SGD.step

        def poisoned(self, *a, **k):
            res = step(self, *a, **k)
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
            return res
        monkeypatch.setattr(torch.optim.SGD, "step", poisoned)
    code, out, err = cli("prune", "--resume", "--out", run, *sets(diverge), "--json", "--quiet")
    assert code == 1
    line = one_error_line(err)
    ck = run / "prune" / "checkpoint.pt"
    assert expect in line and "epoch 3" in line, line
    assert f"the last good checkpoint is {ck} (epoch 2)" in line and "--resume" in line
    assert json.loads(out)["kind"] == "input"
    assert snapshot(run / "prune") == before  # checkpoint, metrics.csv, SHA256SUMS untouched
    assert load_torch(ck, "checkpoint")["epoch"] == 2


def test_resume_after_the_last_checkpoint_completes_metrics_csv(tmp_path):
    """Killed between the last epoch's checkpoint and its metrics.csv: --resume has no epoch left to
    train but still brings the CSV up to date (found by the random-kill exploration)."""
    from smcp_core.prune.metrics import write_metrics_csv

    run = tmp_path / "run"
    code, out, err = cli("prune", "--out", run, *sets(NAN_SETS), "--quiet")
    assert code == 0, err
    csv_path = run / "prune" / "metrics.csv"
    full = csv_path.read_text()
    ck = load_torch(run / "prune" / "checkpoint.pt", "checkpoint")
    write_metrics_csv(csv_path, ck["history"][:-1], unit="MMAC")  # the state such a kill leaves
    assert len(csv_path.read_text().splitlines()) == len(full.splitlines()) - 1
    code, out, err = cli("prune", "--resume", "--out", run, *sets(NAN_SETS), "--quiet")
    assert code == 0, err
    assert csv_path.read_text() == full
    verify_manifests(run)


# --------------------------------------------------------------------------------------------------
# one run directory, one writer


HOLD = """
import sys, time
from smcp_core.utils.fsutil import run_lock
with run_lock(sys.argv[1], "smcp prune"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_writer_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, env=env())
    try:
        assert holder.stdout.readline().strip() == b"locked"
        for command in (["prune"], ["slim"], ["run"], ["profile", "--force"]):
            code, out, err = cli(*command, "--out", run, *sets(NAN_SETS))
            assert code == 1
            line = one_error_line(err)
            assert f"in use by `smcp prune` (pid {holder.pid}" in line and "another --out" in line, line
        assert not (run / "prune").exists() and not (run / "recipe.resolved.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / ".smcp.lock").exists()  # left behind by the killed holder ...
    with run_lock(run, "test"):  # ... and it does not block
        pass
    # a failing command releases the lock
    code, out, err = cli("prune", "--out", run, *sets(NAN_SETS[:-1] + ["prune.target.speedup=2"]))
    assert code == 1 and "latency table" in one_error_line(err)
    with run_lock(run, "test"):
        pass


# --------------------------------------------------------------------------------------------------
# SIGKILL in the middle of `smcp prune`, then --resume: same masks as an uninterrupted run

KILL_SETS = [
    "data.train_subset=256", "data.val_subset=64", "data.batch_size=32", "prune.epochs=5",
    "prune.warmup_epochs=1", "prune.ramp_epochs=3", "prune.cooldown_epochs=1", "prune.max_steps=4",
    "prune.update_interval_samples=96", "prune.target.flops_ratio=0.5",
]


def _prune_proc(out: Path, resume: bool = False) -> subprocess.Popen:
    args = [sys.executable, "-m", "smcp_cli", "prune", "--out", str(out), *sets(KILL_SETS), "--quiet"]
    if resume:
        args.append("--resume")
    return subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lock(proc: subprocess.Popen, out: Path) -> None:
    """Until ``proc`` holds the run directory's lock (its pid in .smcp.lock.info)."""
    t0 = time.monotonic()
    while True:
        try:
            if json.loads((out / ".smcp.lock.info").read_text())["pid"] == proc.pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() - t0 < 120, "the resumed run never took the lock"
        time.sleep(0.02)


def _epochs_done(out: Path) -> int:
    try:
        return max(0, len((out / "prune" / "metrics.csv").read_text().splitlines()) - 1)
    except OSError:
        return 0


def _kill_after_epoch(proc: subprocess.Popen, out: Path, epoch: int, delay: float) -> None:
    t0 = time.monotonic()
    while _epochs_done(out) < epoch:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() - t0 < 240, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(delay)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _check_consistent(out: Path) -> int:
    """After a kill: every recorded artifact verifies, the checkpoint loads, metrics.csv lags by at
    most the epoch being written; returns the checkpoint's epoch."""
    verify_manifests(out)
    ck = load_torch(out / "prune" / "checkpoint.pt", "checkpoint")
    rows = _epochs_done(out)
    assert ck["epoch"] - 1 <= rows <= ck["epoch"], (rows, ck["epoch"])
    assert not (out / "prune" / "pruned.pt").exists()
    return int(ck["epoch"])


def _metrics_without_seconds(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"}
            for r in csv.DictReader((out / "prune" / "metrics.csv").open())]


def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path):
    ref_out, out = tmp_path / "reference", tmp_path / "killed"
    reference = _prune_proc(ref_out)  # runs alongside (one thread each)
    rng = random.Random(int(os.environ.get("SMCP_KILL_SEED", "7")))  # other seeds: other kill moments
    kills = 0
    proc = None
    try:
        proc = _prune_proc(out)
        _kill_after_epoch(proc, out, 1, rng.uniform(0.0, 0.25))
        kills += 1
        print(f"\nkill 1: checkpoint epoch {_check_consistent(out)}, {len(temp_files(out))} stale temp files")
        proc = _prune_proc(out, resume=True)
        # while it runs, a second writer is refused at once (the killed run's stale lock did not block it)
        _wait_for_lock(proc, out)
        code, _, err = cli("prune", "--resume", "--out", out, *sets(KILL_SETS))
        assert code == 1 and "in use by `smcp prune`" in one_error_line(err)
        _kill_after_epoch(proc, out, 3, rng.uniform(0.0, 0.25))
        kills += 1
        print(f"kill 2: checkpoint epoch {_check_consistent(out)}, {len(temp_files(out))} stale temp files")
        assert _check_consistent(out) >= 3
        proc = _prune_proc(out, resume=True)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert "resumed from" not in err  # --quiet
        _, err = reference.communicate(timeout=300)
        assert reference.returncode == 0, err[-2000:]
    finally:
        for p in (reference, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert kills == 2
    a = load_torch(ref_out / "prune" / "pruned.pt", "reference")
    b = load_torch(out / "prune" / "pruned.pt", "resumed")
    assert torch.equal(a["keep"], b["keep"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-6, rtol=0), k
    sa = json.loads((ref_out / "prune" / "summary.json").read_text())
    sb = json.loads((out / "prune" / "summary.json").read_text())
    assert sb["final_cost"] == pytest.approx(sa["final_cost"]) and sb["top1"] == pytest.approx(sa["top1"])
    # one metrics row per epoch, no duplicates from the resumes, same numbers as the reference
    ma, mb = _metrics_without_seconds(ref_out), _metrics_without_seconds(out)
    assert [int(r["epoch"]) for r in mb] == [1, 2, 3, 4, 5]
    assert ma == mb
    # no half-written files left; everything recorded verifies and loads
    assert temp_files(out) == []
    assert verify_manifests(out) == 4  # checkpoint.pt, metrics.csv, pruned.pt, summary.json
    load_torch(out / "prune" / "checkpoint.pt", "checkpoint")


# --------------------------------------------------------------------------------------------------
# generated bad input: every case exits 1 with exactly one line on stderr, never a traceback

hyp = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TRIED = {"recipes": 0, "argv": 0}


def _leaves() -> dict[str, object]:
    """Every leaf key of the recipe schema (dotted path -> annotation), model.kwargs excluded."""
    from smcp_core.config.recipe import Recipe, _field_kind

    out = {}

    def walk(cls, prefix):
        for name, f in cls.model_fields.items():
            kind = _field_kind(cls, name)
            path = prefix + name
            if isinstance(kind, type):
                walk(kind, path + ".")
            elif kind is None:
                out[path] = f
    walk(Recipe, "")
    return out


LEAVES = _leaves()
SECTIONS = ["model", "data", "profile", "prune", "export", "prune.target", "prune.optimizer",
            "prune.lr_schedule", "prune.importance"]


def _bounds(field) -> dict:
    import typing

    b: dict = {}

    def scan(meta):
        for m in meta:
            for k in ("ge", "gt", "le", "lt"):
                if getattr(m, k, None) is not None:
                    b[k] = getattr(m, k)
    scan(field.metadata)
    for a in typing.get_args(field.annotation):
        scan(getattr(a, "__metadata__", ()))
    return b


def _kind(field) -> str:
    import typing

    text = str(field.annotation)
    if "Literal" in text:
        return "literal"
    ann = field.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)] or [ann]
    base = typing.get_origin(args[0]) or args[0]
    if base is typing.Annotated:
        base = typing.get_args(args[0])[0]
    if base is list:
        return "list"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(base, "other")


junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=6)
not_numeric = st.text(min_size=1, max_size=8).filter(lambda s: not _is_number(s))


def _chw(s: str) -> bool:
    try:
        c, h, w = (int(v) for v in s.split(","))
    except ValueError:
        return False
    return min(c, h, w) >= 1


def _is_number(s: str) -> bool:
    try:
        float(s.strip().replace("_", ""))
        return True
    except ValueError:
        return False


@st.composite
def bad_leaf(draw):
    """(path, value) with a value the schema must reject."""
    path = draw(st.sampled_from(sorted(LEAVES)))
    field = LEAVES[path]
    kind, b = _kind(field), _bounds(field)
    always = st.dictionaries(st.text(min_size=1, max_size=4), junk, min_size=1, max_size=2)  # never a leaf
    opts = [always, st.lists(always, min_size=1, max_size=2)]
    if kind in ("int", "float"):
        opts += [st.booleans(), not_numeric, st.lists(st.integers(), min_size=1, max_size=2)]
        if "ge" in b:
            opts.append(st.integers(max_value=int(b["ge"]) - 1) if kind == "int"
                        else st.floats(max_value=b["ge"] - 1e-3, allow_nan=False, allow_infinity=False))
        if "gt" in b:
            opts.append(st.integers(max_value=int(b["gt"])) if kind == "int"
                        else st.floats(max_value=b["gt"], allow_nan=False, allow_infinity=False))
        if "le" in b:
            opts.append(st.integers(min_value=int(b["le"]) + 1) if kind == "int"
                        else st.floats(min_value=b["le"] + 1e-3, allow_nan=False, allow_infinity=False))
        if "lt" in b:
            opts.append(st.floats(min_value=b["lt"], allow_nan=False, allow_infinity=False) if kind == "float"
                        else st.integers(min_value=int(b["lt"])))
        if kind == "int":
            opts.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: not float(v).is_integer()))
        else:
            opts.append(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    elif kind == "bool":
        opts += [st.integers().filter(lambda v: v not in (0, 1)),
                 st.text(min_size=1, max_size=8).filter(
                     lambda s: s.strip().lower() not in {"0", "1", "true", "false", "yes", "no", "on", "off",
                                                         "t", "f", "y", "n"})]
    elif kind == "literal":
        import typing

        choices = set()
        for a in [field.annotation, *typing.get_args(field.annotation)]:
            for x in typing.get_args(a):
                if isinstance(x, str):
                    choices.add(x)
            if "Literal" in str(a) and typing.get_origin(a) is typing.Literal:
                choices |= set(typing.get_args(a))
        opts += [st.text(max_size=10).filter(lambda s: s not in choices), st.integers(), st.booleans()]
    elif kind == "str":
        opts += [st.integers(), st.floats(allow_nan=False), st.booleans()]
    elif kind == "list":
        opts += [st.integers(), st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2)]
    return path, draw(st.one_of(opts))


def _set(data: dict, path: str, value) -> None:
    parts = path.split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    if parts[-2:-1] == ["target"] and parts[-1] in ("speedup", "latency_ms", "flops_ratio"):
        for other in ("speedup", "latency_ms", "flops_ratio"):
            if other != parts[-1]:
                node.pop(other, None)


def _yaml_or_none(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except Exception:  # noqa: BLE001
        return None


@st.composite
def bad_recipe(draw) -> bytes:
    import yaml

    from smcp_core.config.recipe import BUILTIN_RECIPE_DIR, Recipe

    kind = draw(st.sampled_from(["leaf", "leaf", "leaf", "unknown", "section", "top", "relation", "text", "bytes"]))
    if kind == "text":
        text = draw(st.text(max_size=60))
        parsed = _yaml_or_none(text)
        if isinstance(parsed, dict) and all(isinstance(k, str) and k in Recipe.model_fields for k in parsed):
            text += "\nzz_unknown: 1\n"  # e.g. "{}" or "name: x" would be a valid recipe
        return text.encode("utf-8")
    if kind == "bytes":
        return b"name: x\n" + draw(st.binary(min_size=1, max_size=20)) + b"\xff\xfe\n"
    base = yaml.safe_load(
        (BUILTIN_RECIPE_DIR / draw(st.sampled_from(["quickstart.yaml", "cifar10_resnet56_2x.yaml"]))).read_text())
    for _ in range(draw(st.integers(0, 2))):  # noise: random values anywhere (valid or not)
        _set(base, draw(st.sampled_from(sorted(LEAVES))), draw(junk))
    if kind == "leaf":
        for _ in range(draw(st.integers(1, 2))):
            _set(base, *draw(bad_leaf()))
    elif kind == "unknown":
        sec = draw(st.sampled_from(["", *SECTIONS]))
        from smcp_core.config import recipe as R

        cls = R.Recipe
        for p in [p for p in sec.split(".") if p]:
            cls = R._field_kind(cls, p)
        key = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in cls.model_fields))
        _set(base, f"{sec}.{key}" if sec else key, draw(junk))
    elif kind == "section":
        _set(base, draw(st.sampled_from(SECTIONS)), draw(st.one_of(st.integers(), st.text(min_size=1, max_size=5),
                                                                   st.lists(st.integers(), max_size=2), st.booleans())))
    elif kind == "top":
        value = draw(st.one_of(st.lists(junk, max_size=3), st.integers(), st.floats(), st.booleans(),
                               st.text(min_size=1, max_size=5)))
        text = yaml.safe_dump(value, allow_unicode=True)
        if isinstance(_yaml_or_none(text), dict) or _yaml_or_none(text) is None:
            text = "- " + text  # a list at the top level, then
        return text.encode("utf-8")
    else:  # relations between keys
        which = draw(st.sampled_from(["schedule", "targets", "min_lr", "nesterov", "trt"]))
        if which == "schedule":
            _set(base, "prune.epochs", draw(st.integers(0, 3)))
            _set(base, "prune.warmup_epochs", 2)
            _set(base, "prune.ramp_epochs", 2)
        elif which == "targets":
            base["prune"]["target"] = {"speedup": 2.0, "flops_ratio": 0.5}
        elif which == "min_lr":
            _set(base, "prune.optimizer.lr", 0.01)
            _set(base, "prune.lr_schedule.min_lr", 0.5)
        elif which == "nesterov":
            _set(base, "prune.optimizer.nesterov", True)
            _set(base, "prune.optimizer.momentum", 0)
        else:
            _set(base, "profile.backend", "tensorrt")
            _set(base, "profile.device", "cpu")
    return yaml.safe_dump(base, allow_unicode=True, sort_keys=False).encode("utf-8")


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(content=bad_recipe(), command=st.sampled_from(["slim", "export"]))
def test_generated_bad_recipes_exit_1_with_one_line(tmp_path_factory, content, command):
    TRIED["recipes"] += 1
    d = tmp_path_factory.mktemp("fz")
    (d / "r.yaml").write_bytes(content)
    code, out, err = cli(command, "--recipe", d / "r.yaml", "--out", d / "run")
    assert code == 1, (code, content, err)
    line = one_error_line(err)
    # the recipe loader caught it (the stage never started)
    assert line.startswith("error: recipe "), (line, content)
    assert out == ""
    assert not (d / "run").exists()


OPTIONS = {  # valid option groups per command (none of them starts any work on its own)
    "common": [["--quiet"], ["-q"], ["--json"], ["--out", "OUT"], ["-o", "OUT"], ["--set", "prune.epochs=3"],
               ["-s", "seed=1"], ["-r", "quickstart"], ["--recipe", "quickstart"]],
    "profile": [["--backend", "torch"], ["--batch-size", "4"], ["--device", "cpu"], ["--force"]],
    "prune": [["--resume"], ["--force-table"]],
    "slim": [],
    "export": [],
    "run": [["--force"]],
    "inspect": [["--json"], ["--quiet"], ["--input-size", "3,32,32"], ["--num-classes", "10"], ["-s", "seed=2"]],
    "report": [["--json"], ["--quiet"], ["--no-html"], ["--out", "OUT"]],
}


def _known_opts(cmd: str) -> set[str]:
    import typer

    from smcp_cli.app import app

    c = typer.main.get_command(app).commands[cmd]
    return {o for p in c.params for o in (*p.opts, *getattr(p, "secondary_opts", []))} | {"--help"}


token = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                min_size=1, max_size=12)


@st.composite
def bad_argv(draw) -> list[str]:
    from smcp_core.config.recipe import Recipe, _all_paths

    cmd = draw(st.sampled_from(sorted(k for k in OPTIONS if k != "common")))
    pool = OPTIONS[cmd] + (OPTIONS["common"] if cmd not in ("inspect", "report") else [])
    argv = [cmd]
    if cmd == "report":
        argv.append("RUNDIR")
    for g in draw(st.lists(st.sampled_from(pool), max_size=3)):
        argv += g
    known = _known_opts(cmd)
    kinds = ["unknown_long", "unknown_short", "set_unknown_key", "set_malformed", "set_bad_value",
             "extra_positional", "missing_value", "unknown_command"]
    if cmd not in ("inspect", "report"):
        kinds += ["recipe_missing", "recipe_dir"]
    if cmd == "profile":
        kinds += ["bad_int", "bad_batch"]
    if cmd == "inspect":
        kinds += ["bad_input_size", "bad_model", "bad_classes"]
    kind = draw(st.sampled_from(kinds))
    if kind == "unknown_long":
        opt = "--" + draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=10))
        if opt in known or opt in ("--version",):
            opt += "-zz"
        argv.append(opt)
    elif kind == "unknown_short":
        argv.append("-" + draw(st.sampled_from("abcdefgijklmnptuvwxyzABCDEFGIJKLMNOPQRSTUVWXYZ")))
    elif kind == "set_unknown_key":
        key = ".".join(draw(st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8),
                                     min_size=1, max_size=3)))
        paths = set(_all_paths(Recipe))
        if key in paths or key.startswith("model.kwargs"):
            key = "zz_" + key
        argv += ["--set", f"{key}={draw(token)}"]
    elif kind == "set_malformed":
        argv += ["--set", draw(st.one_of(
            token.filter(lambda s: "=" not in s and not s.startswith("-")),
            st.sampled_from(["=3", "a..b=1", ".=1", "prune.=1", "prune..epochs=1", " =", "prune=3", "name.x=1",
                             "prune.epochs=[1", "model.kwargs={a: &x [*x]}", "prune.epochs=" + "[" * 2000,
                             "prune.target.speedup.x=1"])))]
    elif kind == "set_bad_value":
        path, value = draw(bad_leaf())
        argv += ["--set", f"{path}={json.dumps(value, allow_nan=True)}"]
    elif kind == "extra_positional":
        tok = draw(token.filter(lambda s: not s.startswith("-")))
        if cmd == "inspect":
            argv += ["cifar/resnet20", tok]
        else:
            argv.append(tok)
    elif kind == "missing_value":
        argv.append(draw(st.sampled_from([o for o in ("--out", "--set", "-r", "--input-size", "--batch-size")
                                          if o in known])))
    elif kind == "unknown_command":
        argv = [draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(
            lambda s: s not in OPTIONS))] + argv[1:]
    elif kind == "recipe_missing":
        argv += ["--recipe", "does/not/exist-" + draw(st.text(alphabet="abc", max_size=4)) + ".yaml"]
    elif kind == "recipe_dir":
        argv += ["--recipe", "RUNDIR"]
    elif kind == "bad_int":
        argv += ["--batch-size", draw(not_numeric)]
    elif kind == "bad_batch":
        argv += ["--batch-size", str(draw(st.integers(max_value=0)))]
    elif kind == "bad_classes":
        argv = ["inspect", "cifar/resnet20"] + argv[1:] + ["--num-classes", str(draw(st.integers(max_value=0)))]
    elif kind == "bad_input_size":
        argv = ["inspect", "cifar/resnet20"] + argv[1:] + ["--input-size", draw(st.one_of(
            st.text(max_size=10).filter(lambda s: not _chw(s)),
            st.sampled_from(["1,2", "3,x,3", "", "3,32,32,1", "0,32,32", "3,-1,32"])))]
    elif kind == "bad_model":
        argv.insert(1, draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=10).filter(
            lambda s: s not in ("mobilenet_v1", "quickstart", "rn50_fps2x", "cifar10_resnet56_2x"))))
    return argv


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(argv=bad_argv())
def test_generated_bad_arguments_exit_1_with_one_line(tmp_path_factory, argv):
    TRIED["argv"] += 1
    d = tmp_path_factory.mktemp("argv")
    (d / "rundir").mkdir()
    argv = [str(d / "out") if a == "OUT" else str(d / "rundir") if a == "RUNDIR" else a for a in argv]
    code, out, err = cli(*argv)
    assert code == 1, (argv, code, err)
    line = one_error_line(err)
    if "--json" in argv:
        doc = json.loads(out)
        assert doc["ok"] is False and doc["exit_code"] == 1 and doc["error"] == line[len("error: "):]
    else:
        assert out == "", (argv, out)
    assert not (d / "out").exists(), argv  # nothing was started


def test_generated_inputs_were_tried():
    # runs after the two property tests in file order; recorded for the README's reliability figures
    if TRIED["recipes"] == 0 or TRIED["argv"] == 0:
        pytest.skip("run together with the property tests")
    print(f"\ngenerated bad inputs tried: {TRIED['recipes']} recipes, {TRIED['argv']} argument lists")
    assert TRIED["recipes"] >= 200 and TRIED["argv"] >= 100


def test_example_workflow_gates_on_the_json_report():
    import yaml

    wf = yaml.safe_load((REPO_ROOT / "examples" / "github-actions-deploy.yml").read_text())
    steps = wf["jobs"]["prune"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    for cmd in ("smcp profile", "smcp prune", "smcp slim", "smcp export"):
        line = next(l for l in runs.splitlines() if cmd in l)
        assert "--json" in line and "--quiet" in line, line
    export = next(s["run"] for s in steps if "smcp export" in s.get("run", ""))
    assert "set +e" in export and "2) " in export and "exit 2" in export
    assert wf["jobs"]["deploy"]["needs"] == "prune"


def test_checksum_records_stay_consistent_when_a_write_is_interrupted(tmp_path, monkeypatch):
    """SHA256SUMS is updated in two steps around the rename: whatever step a crash interrupts, the
    file on disk matches its record (no false 'corrupt' after a kill)."""
    from smcp_core.utils import fsutil

    p = tmp_path / "a.json"
    fsutil.atomic_write_json(p, {"v": 1}, checksum=True)
    old = p.read_bytes()
    real_replace = os.replace

    def crash_on_file(src, dst):
        if Path(dst) == p:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", crash_on_file)  # killed before the file's rename
    with pytest.raises(KeyboardInterrupt):
        fsutil.atomic_write_json(p, {"v": 2}, checksum=True)
    monkeypatch.setattr(fsutil.os, "replace", real_replace)
    assert p.read_bytes() == old and fsutil.verify_checksum(p, "a") is True
    assert len((tmp_path / CHECKSUMS).read_text().splitlines()) == 2  # old + new digest
    assert not list(tmp_path.glob(".*.tmp"))

    real_set = fsutil._set_sums
    calls = []

    def crash_second(path, digests):
        calls.append(digests)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_set(path, digests)

    monkeypatch.setattr(fsutil, "_set_sums", crash_second)  # killed after the rename, before the clean-up
    with pytest.raises(KeyboardInterrupt):
        fsutil.atomic_write_json(p, {"v": 3}, checksum=True)
    monkeypatch.setattr(fsutil, "_set_sums", real_set)
    assert json.loads(p.read_text()) == {"v": 3} and fsutil.verify_checksum(p, "a") is True
    fsutil.atomic_write_json(p, {"v": 4}, checksum=True)
    assert len((tmp_path / CHECKSUMS).read_text().splitlines()) == 1
    p.write_text('{"v": 5}\n')
    from smcp_core.errors import SmcpError

    with pytest.raises(SmcpError, match="corrupt or was changed"):
        fsutil.read_json(p, "a")


def test_run_lock_is_exclusive_in_one_process_too(tmp_path):
    from smcp_core.errors import SmcpError

    with run_lock(tmp_path, "smcp prune"):
        with pytest.raises(SmcpError, match=f"in use by `smcp prune` \\(pid {os.getpid()}"):
            with run_lock(tmp_path, "smcp run"):
                pass
    with run_lock(tmp_path, "smcp run"):
        pass
    assert not (tmp_path / ".smcp.lock.info").exists()


def test_stamps_follow_checkpoint_bytes_not_its_mtime_or_path(tmp_path):
    """Re-provisioned data (same bytes, new mtime, other directory) keeps runs up to date; changed
    bytes make them stale (a stamp built on mtime re-trained every run after a copy)."""
    from smcp_core import stages
    from smcp_core.config.recipe import load_recipe

    a = tmp_path / "a" / "w.pt"
    a.parent.mkdir()
    torch.save({"w": torch.arange(10.0)}, a)
    b = tmp_path / "b" / "w.pt"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    os.utime(b, (1, 1))

    def st(path: Path) -> str:
        return stages.stamp(load_recipe("quickstart", [f"model.checkpoint={path}"]), "prune")

    assert st(a) == st(b)
    torch.save({"w": torch.arange(10.0) + 1}, b)
    assert st(a) != st(b)
