"""SNIP vs global magnitude pruning vs dense on LeNet-300-100 and LeNet-5-Caffe (MNIST, Fashion-MNIST).

Unstructured pruning, so this measures accuracy against the number of weights kept -- and shows
that a dense runtime gets no faster from the zeros (CPU latency of the dense and the sparse model,
timed interleaved in this process with :func:`smcp_core.profile.timing.time_interleaved`).

Methods (every run of one dataset/model starts from the same seeded initialisation and sees the
training batches in the same order):

* ``dense``     -- train ``E`` epochs.
* ``snip``      -- SNIP masks from ONE batch of 128 training images at initialisation, applied with
  ``torch.nn.utils.prune``; then train ``E`` epochs exactly like dense.
* ``magnitude`` -- global magnitude pruning of the *trained dense* model, then ``E`` epochs of
  fine-tuning with the masks applied (so it has seen ``2E`` epochs in total, dense ones included --
  the classical train-prune-retrain baseline).

Schedules are shortened to fit a 2-core CPU: Adam (lr 3e-3, cosine decay to 0 per run), batch 128,
a few epochs (the SNIP paper trains for far longer: its published errors are not comparable).

Data (never downloaded):

* MNIST: only the official **test** set (10,000 images) is available here (``<shared>/mnist``, see
  ``SMCP_SHARED_DATA``); it is split deterministically (seeded permutation, seed 0) into 8,000
  training and 2,000 test images.
* Fashion-MNIST: the official train/test files from Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``); training uses a seeded subset of ``--fashion-train``
  images (default 12,000 of 60,000), testing the full 10,000.  Skipped with a message when the
  package is not installed.

    python benchmarks/snip_lenet.py            # about 8-12 minutes on a busy 2-core VM
    python benchmarks/snip_lenet.py --quick    # smoke run, about 1 minute

Prints a markdown table and writes every number to ``--out`` (default
``benchmarks/results/snip_lenet.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from smcp_core.data.idx import DEBIAN_FASHION_MNIST, load_mnist_like  # noqa: E402
from smcp_core.models.lenet import lenet5_caffe, lenet_300_100  # noqa: E402
from smcp_core.profile.fingerprint import environment_report  # noqa: E402
from smcp_core.profile.timing import time_interleaved, torch_runner  # noqa: E402
from smcp_core.prune.unstructured import (
    apply_masks,
    magnitude_masks,
    remove_masks,
    snip_masks,
    sparsity_report,
    unstructured_speed_note,
)

MODELS = {"lenet300": ("LeNet-300-100", lenet_300_100), "lenet5": ("LeNet-5-Caffe", lenet5_caffe)}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def shared_data_dir() -> Path:
    env = os.environ.get("SMCP_SHARED_DATA")
    return Path(env).expanduser().resolve() if env else (REPO.parent / "shared" / "data").resolve()


# --------------------------------------------------------------------------------------------- data


def load_datasets(args) -> tuple[dict, list[str]]:
    """{name: dict(train=(x, y), test=(x, y), description=...)} and notes on what was skipped."""
    out, notes = {}, []
    if "mnist" in args.datasets:
        root = shared_data_dir() / "mnist"
        if (root / "t10k-images-idx3-ubyte.gz").is_file():
            x, y = load_mnist_like(root, "test", dataset="mnist")
            perm = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
            n_train = args.mnist_train
            tr, te = perm[:n_train], perm[n_train:]
            out["MNIST"] = {
                "train": (x[tr], y[tr]),
                "test": (x[te], y[te]),
                "epochs": args.epochs_mnist,
                "description": (
                    f"official MNIST TEST set only (10,000 images, {root}), split by a seeded permutation "
                    f"(seed 0) into {len(tr)} train / {len(te)} test; normalised with mean 0.1307, std 0.3081"
                ),
            }
        else:
            notes.append(f"MNIST skipped: {root}/t10k-images-idx3-ubyte.gz not found (set SMCP_SHARED_DATA)")
    if "fashion-mnist" in args.datasets:
        root = Path(args.fashion_root)
        if (root / "train-images-idx3-ubyte.gz").is_file():
            xtr, ytr = load_mnist_like(root, "train", dataset="fashion-mnist")
            xte, yte = load_mnist_like(root, "test", dataset="fashion-mnist")
            n = min(args.fashion_train, len(ytr))
            idx = torch.from_numpy(np.random.default_rng(1).permutation(len(ytr))[:n])
            out["Fashion-MNIST"] = {
                "train": (xtr[idx], ytr[idx]),
                "test": (xte, yte),
                "epochs": args.epochs_fashion,
                "description": (
                    f"official Fashion-MNIST from {root}: a seeded subset (seed 1) of {n} of the {len(ytr)} "
                    f"training images, the full {len(yte)}-image test set; normalised with mean 0.2860, std 0.3530"
                ),
            }
        else:
            notes.append(
                f"Fashion-MNIST skipped: not found in {root} (apt-get install dataset-fashion-mnist)"
            )
    return out, notes


# ------------------------------------------------------------------------------------ train / eval


def train(model, data, epochs: int, *, seed: int, batch_size: int, lr: float, channels_last: bool) -> float:
    x, y = data
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            b = order[i : i + batch_size]
            xb = x[b]
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), y[b]).backward()
            opt.step()
            sched.step()
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    return time.perf_counter() - t0


@torch.no_grad()
def top1(model, data, batch_size: int = 1000) -> float:
    x, y = data
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return 100.0 * correct / len(y)


def latency(dense, sparse, example: torch.Tensor, max_seconds: float) -> dict:
    """Interleaved CPU latency (ms, median) of the dense and the sparse model at batch 1."""
    stats = time_interleaved(
        {"dense": torch_runner(copy.deepcopy(dense), example), "sparse": torch_runner(copy.deepcopy(sparse), example)},
        warmup=10,
        min_runs=50,
        max_runs=5000,
        max_seconds=max_seconds,
    )
    d, s = stats["dense"], stats["sparse"]
    return {
        "dense_ms": d.median_ms,
        "sparse_ms": s.median_ms,
        "sparse_over_dense": s.median_ms / d.median_ms,
        "dense": d.to_dict(),
        "sparse": s.to_dict(),
    }


# ----------------------------------------------------------------------------------------- main


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    datasets, notes = load_datasets(args)
    for n in notes:
        log(n)
    rows = []
    for ds_name, ds in datasets.items():
        xtr, ytr = ds["train"]
        # the single SNIP batch: 128 training images chosen by a fixed seed
        snip_idx = torch.from_numpy(np.random.default_rng(2).permutation(len(ytr))[: args.snip_batch])
        snip_batch = (xtr[snip_idx], ytr[snip_idx])
        example = xtr[:1].clone()
        for key in args.models:
            label, factory = MODELS[key]
            cl = key == "lenet5"
            kw = dict(batch_size=args.batch_size, lr=args.lr, channels_last=cl)
            epochs = ds["epochs"]
            torch.manual_seed(args.seed)
            init_state = copy.deepcopy(factory().state_dict())

            def fresh(factory=factory, init_state=init_state):
                m = factory()
                m.load_state_dict(init_state)
                return m

            dense = fresh()
            secs = train(dense, ds["train"], epochs, seed=args.seed, **kw)
            acc = top1(dense, ds["test"])
            rep = sparsity_report(dense)
            row = _row(ds_name, label, "dense", 0.0, acc, rep, epochs, secs)
            row["latency"] = latency(dense, dense, example, args.latency_seconds)  # dense vs itself: noise floor
            rows.append(row)
            log(f"[{time.perf_counter() - t_start:6.0f}s] {ds_name} {label} dense: top-1 {acc:.2f}% ({secs:.0f}s)")
            for s in args.sparsities:
                for method in args.methods:
                    if method == "snip":
                        model = fresh()
                        t0 = time.perf_counter()
                        masks = snip_masks(model, F.cross_entropy, snip_batch, s)  # once, at initialisation
                        score_s = time.perf_counter() - t0
                    else:
                        model = copy.deepcopy(dense)
                        t0 = time.perf_counter()
                        masks = magnitude_masks(model, s)  # of the trained dense model
                        score_s = time.perf_counter() - t0
                    apply_masks(model, masks)
                    secs = train(model, ds["train"], epochs, seed=args.seed, **kw)
                    remove_masks(model)
                    acc = top1(model, ds["test"])
                    rep = sparsity_report(model)
                    row = _row(ds_name, label, method, s, acc, rep, epochs, secs)
                    row["score_seconds"] = score_s
                    row["latency"] = latency(dense, model, example, args.latency_seconds)
                    rows.append(row)
                    log(
                        f"[{time.perf_counter() - t_start:6.0f}s] {ds_name} {label} {method} {s:.0%}: "
                        f"top-1 {acc:.2f}%, kept {rep['global']['kept']} weights, "
                        f"collapsed {rep['fully_pruned'] or '-'} ({secs:.0f}s)"
                    )
    total = time.perf_counter() - t_start
    return {
        "benchmark": "snip_lenet",
        "datasets": {k: v["description"] for k, v in datasets.items()},
        "skipped": notes,
        "schedule": {
            "optimizer": f"Adam lr {args.lr}, cosine decay to 0 over each run, batch {args.batch_size}",
            "epochs": {k: v["epochs"] for k, v in datasets.items()},
            "dense": "E epochs from the seeded initialisation",
            "snip": f"masks from one batch of {args.snip_batch} training images at initialisation, then E epochs",
            "magnitude": "global magnitude masks of the trained dense model, then E epochs of fine-tuning (2E total)",
            "note": "shortened schedules to fit a 2-core CPU; not comparable to published numbers",
        },
        "latency_setup": {
            "what": "median forward latency at batch 1, dense vs sparse (masks baked in) model, "
            "timed interleaved in one process (smcp_core.profile.timing.time_interleaved), torch eager, float32",
            "threads": args.threads,
            "max_seconds_per_pair": args.latency_seconds,
        },
        "note": unstructured_speed_note(),
        "rows": rows,
        "total_seconds": total,
        "environment": environment_report(backend="torch", device="cpu", threads=args.threads, batch_size=1),
        "command": "python benchmarks/snip_lenet.py " + " ".join(sys.argv[1:]),
    }


def _row(ds, model, method, s, acc, rep, epochs, secs) -> dict:
    return {
        "dataset": ds,
        "model": model,
        "method": method,
        "sparsity": s,
        "top1": acc,
        "weights_total": rep["global"]["weights"],
        "weights_kept": rep["global"]["kept"],
        "measured_sparsity": rep["global"]["sparsity"],
        "params_total": rep["model"]["params"],
        "params_nonzero": rep["model"]["nonzero"],
        "layer_sparsity": {k: v["sparsity"] for k, v in rep["layers"].items()},
        "fully_pruned_layers": rep["fully_pruned"],
        "epochs": epochs,
        "train_seconds": secs,
    }


def markdown(res: dict) -> str:
    lines = ["## SNIP vs magnitude vs dense (unstructured), shortened CPU schedules", ""]
    for k, v in res["datasets"].items():
        lines.append(f"- **{k}**: {v}")
    for n in res["skipped"]:
        lines.append(f"- {n}")
    sch = res["schedule"]
    lines.append(
        f"- Schedule: {sch['optimizer']}; epochs {sch['epochs']}; snip: {sch['snip']}; "
        f"magnitude: {sch['magnitude']}. {sch['note']}."
    )
    lat = res["latency_setup"]
    lines.append(f"- Latency: {lat['what']}, {lat['threads']} thread(s).")
    lines += [
        "",
        "| dataset | model | method | sparsity | top-1 % | params kept (non-zero / total) | "
        "CPU latency dense ms | sparse ms | sparse/dense |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lt = r["latency"]
        kept = f"{r['params_nonzero']:,} / {r['params_total']:,} ({100 * r['params_nonzero'] / r['params_total']:.1f}%)"
        flag = " (layer collapsed: " + ", ".join(r["fully_pruned_layers"]) + ")" if r["fully_pruned_layers"] else ""
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['method']}{flag} | {r['sparsity']:.0%} | {r['top1']:.2f} | {kept} | "
            f"{lt['dense_ms']:.3f} | {lt['sparse_ms']:.3f} | {lt['sparse_over_dense']:.2f} |"
        )
    lines += ["", res["note"], "", f"Total time {res['total_seconds']:.0f} s."]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="mnist,fashion-mnist")
    p.add_argument("--models", default="lenet300,lenet5")
    p.add_argument("--methods", default="snip,magnitude")
    p.add_argument("--sparsities", default="0.9,0.95,0.98,0.99")
    p.add_argument("--epochs-mnist", type=int, default=4)
    p.add_argument("--epochs-fashion", type=int, default=3)
    p.add_argument("--mnist-train", type=int, default=8000, help="of the 10,000 MNIST test images")
    p.add_argument("--fashion-train", type=int, default=12000, help="subset of the 60,000 training images")
    p.add_argument("--fashion-root", default=str(DEBIAN_FASHION_MNIST))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--snip-batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy 2-core VM)")
    p.add_argument("--latency-seconds", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, small subsets, 2 sparsities")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "snip_lenet.json"))
    a = p.parse_args(argv)
    a.datasets = [d for d in a.datasets.split(",") if d]
    a.models = [m for m in a.models.split(",") if m]
    a.methods = [m for m in a.methods.split(",") if m]
    a.sparsities = [float(s) for s in a.sparsities.split(",") if s]
    bad = [m for m in a.models if m not in MODELS] + [m for m in a.methods if m not in ("snip", "magnitude")]
    bad += [d for d in a.datasets if d not in ("mnist", "fashion-mnist")]
    if bad:
        p.error(f"unknown value(s): {bad}")
    if a.quick:
        a.epochs_mnist = a.epochs_fashion = 1
        a.fashion_train = min(a.fashion_train, 4000)
        a.sparsities = a.sparsities[::3] or a.sparsities
        a.latency_seconds = min(a.latency_seconds, 0.5)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    print(markdown(res))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
