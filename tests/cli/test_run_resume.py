"""Issue 17: Ctrl-C in `smcp run` loses no work.  The interrupted message names the option that
continues; `smcp run --resume` continues the prune; a plain `smcp run` never deletes an interrupted
prune's checkpoint (one line, exit 1); `--force` starts over on purpose.

To stay quick, `smcp run` here runs only its prune stage (the registry's own entry, with its
options): the other stages do not take part in resuming, and without export the run ends with the
one-line "export report" error (exit 1) after the prune."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import TINY, cli, one_error_line, sets

import smcp_core.stages
from smcp_core.config.recipe import load_recipe
from smcp_core.prune.trainer import PruneTrainer
from smcp_core.stages.artifacts import up_to_date
from smcp_core.stages.pruning import refuse_to_discard_checkpoint
from smcp_core.stages.registry import PIPELINE

FAST = TINY
PRUNE_STAGE = next(s for s in PIPELINE if s.name == "prune")


@pytest.fixture(autouse=True)
def _prune_only(monkeypatch):
    monkeypatch.setattr(smcp_core.stages, "PIPELINE", (PRUNE_STAGE,))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_single_thread):
    yield


ORIGINAL_CHECKPOINT = PruneTrainer.checkpoint


def _ctrl_c_after_epoch(monkeypatch, epoch: int) -> None:
    """Ctrl-C right after the ``epoch``-th checkpoint (of this run) is written."""
    written = []

    def checkpoint(self, e):
        ORIGINAL_CHECKPOINT(self, e)
        written.append(e)
        if len(written) >= epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(PruneTrainer, "checkpoint", checkpoint)


def _epochs(run: Path) -> list[int]:
    return [int(r["epoch"]) for r in csv.DictReader((run / "prune" / "metrics.csv").open())]


def test_prune_stage_takes_resume_in_run():
    assert "resume" in next(s for s in PIPELINE if s.name == "prune").options


def test_help_says_what_happens_to_the_checkpoint():
    code, out, _ = cli("run", "--help")
    assert code == 0 and "--resume" in out and "--force" in out
    code, out, _ = cli("prune", "--help")
    assert code == 0 and "discards" in " ".join(out.split())


def test_interrupted_run_is_kept_resumed_or_restarted_only_when_asked(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _ctrl_c_after_epoch(monkeypatch, 1)
    code, _, err = cli("run", "--out", run, *sets(FAST), "--quiet")
    assert code == 130, err[-2000:]
    assert "smcp run --resume" in err and "smcp prune --resume" in err
    ck = run / "prune" / "checkpoint.pt"
    saved = ck.read_bytes()
    assert _epochs(run) == [1]

    # a plain run does not start over: one line, exit 1, the checkpoint untouched
    monkeypatch.setattr(PruneTrainer, "checkpoint", ORIGINAL_CHECKPOINT)
    code, out, err = cli("run", "--out", run, *sets(FAST), "--quiet")
    assert code == 1, err[-2000:]
    line = one_error_line(err, alone=False)
    assert "interrupted prune" in line and "--resume" in line and "--force" in line, line
    assert out == ""
    assert ck.read_bytes() == saved and _epochs(run) == [1]

    # --resume continues from epoch 1
    code, out, err = cli("run", "--out", run, *sets(FAST), "--resume")
    assert code == 1 and "export report" in err, err[-3000:]  # (export did not run, see above)
    assert "resumed from" in " ".join((out + err).split())
    assert _epochs(run) == [1, 2, 3, 4]
    assert (run / "prune" / "pruned.pt").exists()

    # the checkpoint of a finished prune that a recipe change made out of date holds no unfinished work
    changed = load_recipe("quickstart", FAST + ["prune.label_smoothing=0.2"])
    assert not up_to_date(changed, run, "prune")
    refuse_to_discard_checkpoint(changed, run)  # no error


def test_force_starts_the_interrupted_prune_over(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _ctrl_c_after_epoch(monkeypatch, 2)
    code, _, err = cli("run", "--out", run, *sets(FAST), "--quiet")
    assert code == 130, err[-2000:]
    assert _epochs(run) == [1, 2]
    _ctrl_c_after_epoch(monkeypatch, 1)
    code, out, err = cli("run", "--out", run, *sets(FAST), "--force")
    assert code == 130, err[-2000:]
    assert "resumed from" not in " ".join((out + err).split())
    assert _epochs(run) == [1]  # started over: the old epochs are gone
