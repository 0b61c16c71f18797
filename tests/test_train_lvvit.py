"""examples/train_lvvit.py (tl_fast.train) end to end on CPU: loss falls on every backend, exact resume, best
checkpoint, timm models, two-process DDP.

A tiny image folder (3 classes of coloured quadrant scenes) and a matching real label store are
written once per module; the model is a 2-block LV-ViT at 32 px, so each run takes seconds.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tl_fast.store import StoreWriter

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_lvvit.py"
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230]], dtype=np.float64)
MAP = 6


def _load_trainer(script: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(script.stem, script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """``train/`` and ``val/`` folders of JPEGs whose class colour fills most of the image, with a
    patch of another class in one corner; the label map says which class is where."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    store = root / "labels.tlstore"
    with StoreWriter(store, num_classes=3, topk=2, map_size=(MAP, MAP)) as writer:
        for split, per_class in (("train", 8), ("val", 4)):
            for c in range(3):
                (root / split / f"c{c}").mkdir(parents=True)
                for i in range(per_class):
                    h, w = (int(v) for v in rng.integers(40, 64, size=2))
                    other = (c + 1 + i % 2) % 3
                    cls_map = np.full((MAP, MAP), c)
                    cls_map[: MAP // 2, : MAP // 2] = other
                    ys = np.minimum(np.arange(h) * MAP // h, MAP - 1)
                    xs = np.minimum(np.arange(w) * MAP // w, MAP - 1)
                    img = COLOURS[cls_map[ys][:, xs]] + rng.normal(0, 12, (h, w, 3))
                    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / split / f"c{c}" / f"{i}.jpg",
                                                                            quality=92)
                    if split == "train":
                        values = np.stack([np.full((MAP, MAP), 6.0), np.full((MAP, MAP), 1.0)]).astype(np.float16)
                        indices = np.stack([cls_map, (cls_map + 1) % 3]).astype(np.int16)
                        writer.add(f"c{c}/{i}", values, indices)
    return root


def _tiny(data):
    """The data, model and recipe of every run here (a 2-block LV-ViT at 32 px)."""
    return ["--data", str(data), "--labels", str(data / "labels.tlstore"), "--model", "lvvit_demo",
            "--img-size", "32", "--patch-size", "8", "--dim", "32", "--depth", "2", "--heads", "2",
            "--batch-size", "6", "--workers", "0", "--lr", "0.2", "--warmup-epochs", "0.5", "--aa", "none",
            "--crop-scale", "0.5", "--device", "cpu", "--no-progress", "--log-every", "1"]


def _args(data, out, loader="torch", *extra):
    return ["--loader", loader, *_tiny(data), "--output", str(out), *extra]


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _train_losses(out):
    return {r["step"]: r["loss"] for r in _log(out) if r["event"] == "train"}


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali", "ffcv"])
def test_few_steps_reduce_loss(dataset, tmp_path, loader):
    trainer = _load_trainer()
    result = trainer.main(_args(dataset, tmp_path, loader, "--epochs", "4"))
    losses = _train_losses(tmp_path)
    steps = sorted(losses)
    assert len(steps) == 4 * 4  # 24 images / batch 6, drop_last
    first, last = losses[steps[0]], np.mean([losses[s] for s in steps[-4:]])
    assert last < 0.8 * first, (loader, [round(losses[s], 3) for s in steps])
    assert {"top1", "top5", "ema_top1", "ema_top5"} <= set(result) and result["count"] == 12
    assert (tmp_path / "last.pth").is_file() and (tmp_path / "best.pth").is_file()
    best = torch.load(tmp_path / "best.pth", weights_only=False)["state"]
    evals = [r for r in _log(tmp_path) if r["event"] == "epoch"]
    top = max(max(r["top1"], r["ema_top1"]) for r in evals)
    assert best["best_top1"] == top and evals[best["best_epoch"] - 1]["best"] and best["epoch"] == best["best_epoch"]
    if loader == "ffcv":  # val packed without label records (eval reads no maps), train with the store
        assert json.loads((dataset / "val.beton.json").read_text())["has_records"] is False
        assert json.loads((dataset / "train-labels.beton.json").read_text())["has_records"] is True


@pytest.mark.slow
def test_trainer_takes_an_experiments_options_and_loss(dataset, tmp_path):
    """``tl_fast.train.main(add_arguments=..., make_loss=...)``: an experiment adds its own option and
    replaces the loss without a copy of the trainer; the option reaches the loss, and it trains."""
    from tl_fast.train.main import main as train_main

    seen = []

    def add_arguments(parser):
        parser.add_argument("--loss-scale", type=float, default=1.0)

    def make_loss(args, token_model):
        seen.append((args.loss_scale, token_model))

        def loss_fn(outputs, batch):
            cls, tokens = outputs
            return args.loss_scale * batch.loss(cls, tokens)
        return loss_fn

    train_main(_args(dataset, tmp_path, "torch", "--epochs", "4", "--loss-scale", "0.5"), prog="experiment.py",
               add_arguments=add_arguments, make_loss=make_loss)
    assert seen == [(0.5, True)]
    losses = _train_losses(tmp_path)
    steps = sorted(losses)
    assert losses[steps[0]] > 1.25 * np.mean([losses[s] for s in steps[-4:]])
    with pytest.raises(SystemExit):  # the plain trainer does not know the experiment's option
        train_main(_args(dataset, tmp_path / "plain", "torch", "--loss-scale", "0.5"))


@pytest.mark.slow
def test_class_token_only_baseline_runs(dataset, tmp_path):
    trainer = _load_trainer()
    result = trainer.main(_args(dataset, tmp_path, "torch", "--epochs", "1", "--no-token-label"))
    start = next(r for r in _log(tmp_path) if r["event"] == "start")
    assert start["args"]["token_label"] == "False" and start["args"]["mixtoken"] == "False"
    assert 0.0 <= result["top1"] <= 100.0


@pytest.mark.slow
def test_resume_is_exact(dataset, tmp_path):
    trainer = _load_trainer()
    full, part = tmp_path / "full", tmp_path / "part"
    trainer.main(_args(dataset, full, "torch", "--epochs", "2", "--drop-path", "0.2"))
    # Interrupted in the middle of the second epoch (steps 1-4 of 4 + 2 of 4), then resumed.
    trainer.main(_args(dataset, part, "torch", "--epochs", "2", "--drop-path", "0.2", "--max-steps", "6"))
    assert max(_train_losses(part)) == 6
    trainer.main(_args(dataset, part, "torch", "--epochs", "2", "--drop-path", "0.2", "--resume"))
    a, b = _train_losses(full), _train_losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in (7, 8):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    ca, cb = (torch.load(d / "last.pth", weights_only=False) for d in (full, part))
    for key in ("model", "ema"):
        for k in ca[key]:
            torch.testing.assert_close(ca[key][k], cb[key][k], rtol=1e-6, atol=1e-7)
    assert cb["scheduler"] == ca["scheduler"] and cb["state"] == ca["state"]
    # The resumed run is marked in the log: one start, then a resume event where it picked up.
    events = [r for r in _log(part) if r["event"] in ("start", "resume")]
    assert [r["event"] for r in events] == ["start", "resume"]
    assert events[1]["step"] == 6 and events[1]["epoch"] == 1 and events[1]["checkpoint"] == str(part / "last.pth")
    if importlib.util.find_spec("matplotlib"):
        assert (part / "curves.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("model, labels", [("test_resnet", "--label-mode=class"), ("test_vit", "--no-token-label")])
def test_timm_model_trains(dataset, tmp_path, model, labels):
    """Any timm classifier trains on its class output alone (pooled crop targets from the maps, or hard labels);
    with timm's SGD + step schedule, channels_last, accumulated gradients and no EMA; then fine-tunes
    from that checkpoint."""
    trainer = _load_trainer()
    lvvit_only = {"--patch-size", "--dim", "--depth", "--heads"}

    def args(out, *extra):
        a = _args(dataset, out, "torch", *extra)
        return [v for i, v in enumerate(a) if v not in lvvit_only and a[i - 1] not in lvvit_only]
    opts = ["--model", model, labels, "--epochs", "1", "--opt", "sgd", "--sched", "step",
            "--channels-last", "--grad-accum-steps", "2", "--no-model-ema"]
    result = trainer.main(args(tmp_path / "a", *opts))
    assert sorted(_train_losses(tmp_path / "a")) == [1, 2, 3, 4]  # 24 images / batch 6 (2 x 3)
    assert "top1" in result and "ema_top1" not in result
    ckpt = torch.load(tmp_path / "a" / "last.pth", weights_only=False)
    assert ckpt["ema"] is None and ckpt["args"]["model"] == model
    start = next(r for r in _log(tmp_path / "a") if r["event"] == "start")
    assert start["args"]["mixtoken"] == "False" and start["args"]["token_label"] == str(labels != "--no-token-label")
    assert not any(k.startswith("aux_head.") for k in ckpt["model"])  # not wrapped: no token head
    trainer.main(args(tmp_path / "b", *opts, "--initial-checkpoint", str(tmp_path / "a" / "last.pth"), "--max-steps", "1"))
    assert sorted(_train_losses(tmp_path / "b")) == [1]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lvvit_demo", "vit_tiny_patch16_224"])
def test_torchrun_two_processes_gloo(dataset, tmp_path, model):
    """DDP on two CPU processes, LV-ViT and a wrapped timm ViT: every parameter, the aux head included,
    takes part in each step (DDP without find_unused_parameters fails otherwise) and the ranks agree."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           *_args(dataset, tmp_path, "torch", "--epochs", "1", "--batch-size", "3", "--model", model)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # Seen once in several full-suite runs on 2 CPUs: one rank died in a C++ std::terminate (no
        # Python traceback) and the other was then killed. Not reproduced in isolation; retry once so
        # a rare native abort does not hide the assertions below, and say so in the output.
        warnings.warn("torchrun rank aborted in std::terminate; retrying once:\n" + proc.stderr[-2000:])
        for leftover in tmp_path.iterdir():  # a clean output folder for the second run
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    end = next(r for r in _log(tmp_path) if r["event"] == "end")
    assert len(end["rank_digests"]) == 2 and end["ranks_agree"], end
    start = next(r for r in _log(tmp_path) if r["event"] == "start")
    assert start["world_size"] == 2 and start["steps_per_epoch"] == 4  # 24 images / (2 ranks x 3)


@pytest.mark.slow
def test_token_label_evidence_script(dataset, tmp_path):
    """benchmarks.token_label_evidence end to end: both variants train in parallel, the summary holds
    each run's final evaluation and the difference to class-token only, and so does its result row."""
    small = ["--img-size", "32", "--patch-size", "8", "--dim", "32", "--depth", "2", "--heads", "2",
             "--batch-size", "6", "--workers", "0", "--device", "cpu"]
    cmd = [sys.executable, "-m", "benchmarks.token_label_evidence", "--data", str(dataset),
           "--labels", str(dataset / "labels.tlstore"), "--epochs", "2", "--seeds", "0", "--parallel", "2",
           "--workers", "0", "--threads", "1", "--eval-every", "1", "--out", str(tmp_path),
           "--results-dir", str(tmp_path / "results"), "--", *small]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["run"] for r in summary["runs"]] == ["cls-only_s0", "token-label-mixtoken_s0"]
    assert all(r["state"] == "finished" and r["epoch"] == 2 and len(r["evals"]) == 2 for r in summary["runs"])
    table = summary["table"]
    tl = table["token-label-mixtoken"]["per_seed"]["0"]["top1"]
    assert table["token-label-mixtoken"]["minus_cls_only"] == [tl - table["cls-only"]["per_seed"]["0"]["top1"]]
    assert "token-label-mixtoken minus cls-only" in run.stdout
    start = [json.loads(line) for line in (tmp_path / "cls-only_s0" / "log.jsonl").read_text().splitlines()][0]
    assert start["args"]["token_label"] == "False" and start["args"]["img_size"] == "32"
    (row,) = json.loads((tmp_path / "results" / "token_label_evidence.json").read_text())["rows"]
    assert row["target"] == "demo" and row["value"] == pytest.approx(tl, abs=1e-3)
    assert row["details"]["difference"] == pytest.approx(table["token-label-mixtoken"]["minus_cls_only"][0], abs=0.01)
    assert row["machine"]["cpu"] and row["command"].startswith("python -m benchmarks.token_label_evidence --data")



@pytest.mark.slow
def test_demo_compare_trains_both_runs_differing_only_in_labels(dataset, tmp_path):
    """tl_fast.demo.compare (scripts/demo.sh) in a one-epoch configuration: summary.json holds both runs,
    curves.png is drawn, and the two logged trainer configurations differ only in the labels."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "tl_fast.demo.compare", "--seed", "3", "--output", str(out), "--loader", "torch",
           "--workers", "0", "--threads", "1", "--no-progress", "--", *_tiny(dataset), "--epochs", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["epochs"] == 1
    tl, base = summary["token_labeling"], summary["baseline"]
    for r in (tl, base):
        assert 0 <= r["top1"] <= 100 and 0 <= r["top5"] <= 100 and "img_per_s" in r
    assert summary["gain_points"] == pytest.approx(tl["top1"] - base["top1"], abs=0.01)
    assert (out / "curves.png").stat().st_size > 10_000
    starts = {n: next(r for r in _log(out / n) if r["event"] == "start")["args"]
              for n in ("token_labeling", "baseline")}
    differ = sorted(k for k in starts["baseline"] if starts["baseline"][k] != starts["token_labeling"].get(k))
    assert differ == ["output", "token_label"] and summary["config_differences"] == ["token_label"]
    assert starts["token_labeling"]["token_label"] == "True" and starts["baseline"]["mixtoken"] == "False"
    assert starts["token_labeling"]["seed"] == "3" and starts["token_labeling"]["preset"] == "demo"
    lines = run.stdout.strip().splitlines()
    assert lines[-3].strip().startswith("token labeling: top-1") and "points top-1" in lines[-1]

    alone = tmp_path / "alone"
    cmd[cmd.index(str(out))] = str(alone)
    run = subprocess.run([*cmd[:3], "--no-baseline", *cmd[3:]], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((alone / "summary.json").read_text())
    assert "baseline" not in summary and summary["token_labeling"]["top1"] is not None
    assert not (alone / "baseline").exists()


@pytest.mark.slow
def test_timm_vit_trains_with_token_labels_and_fine_tunes_from_a_plain_timm_checkpoint(dataset, tmp_path):
    """--model vit_*: wrapped by token_labeling (aux head, MixToken on the patch embedding), two steps of the
    dense loss, evaluated by the inference rule; EMA and checkpoints hold the aux head; then a plain timm
    checkpoint of the same ViT loads into the wrapped model with only the aux head new."""
    import timm
    trainer = _load_trainer()
    vit = ["--model", "vit_tiny_patch16_224", "--batch-size", "12", "--epochs", "1"]
    result = trainer.main(_args(dataset, tmp_path / "a", "torch", *vit))
    assert sorted(_train_losses(tmp_path / "a")) == [1, 2] and "top1" in result and "ema_top1" in result
    start = next(r for r in _log(tmp_path / "a") if r["event"] == "start")
    assert start["args"]["label_mode"] == "tokens" and start["args"]["mixtoken"] == "True"
    ckpt = torch.load(tmp_path / "a" / "last.pth", weights_only=False)
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, embed_dim=32, depth=2,
                              num_heads=2)
    assert set(ckpt["model"]) == set(plain.state_dict()) | {"aux_head.weight", "aux_head.bias"}
    assert set(ckpt["ema"]) == {f"module.{k}" for k in ckpt["model"]}
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    trainer.main(_args(dataset, tmp_path / "b", "torch", *vit, "--initial-checkpoint", str(tmp_path / "plain.pth"),
                       "--lr", "0", "--warmup-lr", "0", "--max-steps", "1"))
    tuned = torch.load(tmp_path / "b" / "last.pth", weights_only=False)["model"]
    for k, v in plain.state_dict().items():  # learning rate 0: the loaded weights unchanged by the step
        torch.testing.assert_close(tuned[k], v, rtol=0, atol=0)


@pytest.mark.slow
def test_volo_trains_with_token_labels_through_its_own_pieces(dataset, tmp_path):
    """timm's volo_d1_224 (not an LV-ViT although it has a forward_train): the loader's grid is its total
    stride (16: 2x2 at 32 px, while MixToken swaps its stride-8 patch embedding), and its own aux head is the
    token head (the checkpoint has exactly VOLO's keys)."""
    import timm
    trainer = _load_trainer()
    lvvit_only = {"--patch-size", "--dim", "--depth", "--heads"}
    a = _args(dataset, tmp_path, "torch", "--model", "volo_d1_224", "--batch-size", "12", "--epochs", "1",
              "--no-model-ema")
    trainer.main([v for i, v in enumerate(a) if v not in lvvit_only and a[i - 1] not in lvvit_only])
    assert sorted(_train_losses(tmp_path)) == [1, 2]
    ckpt = torch.load(tmp_path / "last.pth", weights_only=False)
    assert set(ckpt["model"]) == set(timm.create_model("volo_d1_224", num_classes=3, img_size=32).state_dict())
    start = next(r for r in _log(tmp_path) if r["event"] == "start")
    assert start["args"]["mixtoken"] == "True"
