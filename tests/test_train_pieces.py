"""tl_fast.train building blocks: timm's optimizer / schedule / EMA / scaler as the trainer builds them,
gradient accumulation, argument checks, checkpoints, evaluation, logging and the curves plot."""
import json
import math
import os
import random
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from tl_fast.models import lvvit_demo
from tl_fast.train import (
    JsonlLogger, ThroughputMeter, evaluate, format_seconds, read_checkpoint, rng_state, save_checkpoint,
    set_rng_state, step_seed,
)
from tl_fast.train.config import build_parser
from tl_fast.train.factories import make_ema, make_optimizer, make_scaler, make_scheduler, scaled_lr
from tl_fast.train.loop import TrainStep


def _args(*argv):
    """The trainer's options as parsed (unset preset options filled with the demo preset)."""
    from tl_fast.train.config import apply_preset
    return apply_preset(build_parser().parse_args(list(argv)))


def test_optimizer_exempts_norms_biases_pos_cls():
    model = lvvit_demo(num_classes=5, img_size=32)
    opt = make_optimizer(_args("--weight-decay", "0.05"), model, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {}
    for group in opt.param_groups:
        by_decay.setdefault(group["weight_decay"], set()).update(names[id(p)] for p in group["params"])
    decay_names, rest_names = by_decay[0.05], by_decay[0.0]
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias", "patch_embed.bn1.weight",
            "blocks.0.norm1.weight", "blocks.0.attn.proj.bias"} <= rest_names
    assert {"blocks.0.attn.qkv.weight", "head.weight", "aux_head.weight", "patch_embed.conv1.weight"} <= decay_names
    assert len(decay_names) + len(rest_names) == len(list(model.parameters()))
    assert isinstance(make_optimizer(_args("--opt", "sgd"), model, lr=0.1), torch.optim.SGD)


def test_demo_preset_sizes_its_own_model_only():
    """The demo's LV-ViT gets the preset's width and 48 px; another --model keeps its own size, and an
    option given on the command line always wins."""
    demo = _args()
    assert (demo.model, demo.dim, demo.heads, demo.patch_size, demo.img_size) == ("lvvit_demo", 128, 4, 6, 48)
    assert (demo.mixtoken, demo.model_ema, demo.label_mode) == (False, False, "tokens")
    vit = _args("--model", "vit_tiny_patch16_224")
    assert (vit.dim, vit.heads, vit.patch_size, vit.img_size) == (None, None, None, 64)
    assert (_args("--img-size", "40", "--dim", "96").img_size, _args("--dim", "96").dim) == (40, 96)
    cnn = _args("--preset", "demo-cnn")
    assert (cnn.dim, cnn.img_size, cnn.model_ema, cnn.eval_every) == (None, 64, True, 1)
    assert _args("--data", "/somewhere").model_ema is True


def _lrs(args, steps_per_epoch, n, lr=1.0):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler(args, opt, steps_per_epoch, lr)
    out = [opt.param_groups[0]["lr"]]
    for t in range(1, n + 1):
        opt.step()
        sched.step_update(num_updates=t)
        out.append(opt.param_groups[0]["lr"])
    return out, opt, sched


def test_schedule_warms_up_then_decays_to_min_lr():
    # 10 epochs x 10 steps, 1 warm-up epoch: lr rises from peak/1000 to the peak, then falls to 1% of it.
    f, _, _ = _lrs(_args("--epochs", "10", "--warmup-epochs", "1"), 10, 100)
    assert f[0] == pytest.approx(1e-3) and f[10] == pytest.approx(1.0, rel=0.02)
    assert all(a < b for a, b in zip(f[:10], f[1:11]))  # warm-up rises
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then decays
    assert f[100] == pytest.approx(0.01, rel=0.05)
    assert f[55] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 45 / 90)), rel=1e-6)
    g, _, _ = _lrs(_args("--epochs", "10", "--warmup-epochs", "0", "--min-lr", "0.2", "--sched", "step",
                         "--decay-epochs", "5", "--decay-rate", "0.5"), 10, 100)
    assert g[0] == g[49] == 1.0 and g[50] == g[99] == 0.5
    assert scaled_lr(1.6e-3, 512) == pytest.approx(8e-4)


def test_schedule_resumes():
    args = _args("--epochs", "5", "--warmup-epochs", "0.5")
    f, opt, sched = _lrs(args, 10, 17)
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = make_scheduler(args, opt2, 10, 1.0)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == f[17]
    full, _, _ = _lrs(args, 10, 18)
    opt2.step()
    sched2.step_update(num_updates=18)
    assert opt2.param_groups[0]["lr"] == full[18]


def test_ema_tracks_and_warms_up():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = make_ema(_args("--model-ema", "--ema-decay", "0.9"), model)  # the demo preset keeps no EMA
    assert make_ema(_args("--no-model-ema"), model) is None
    assert ema.get_decay(1) == 0.0 and 0.0 < ema.get_decay(5) < ema.get_decay(50) <= 0.9
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(model, step=1)  # the first step copies the model
    torch.testing.assert_close(ema.module[0].weight, model[0].weight)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model, step=500)  # then moves (1 - decay) of the way
    torch.testing.assert_close(ema.module[0].weight, before + (1 - 0.9))
    for step in range(501, 700):
        ema.update(model, step=step)
    torch.testing.assert_close(ema.module[0].weight, model[0].weight)
    torch.testing.assert_close(ema.module[1].running_mean, model[1].running_mean)
    assert not any(p.requires_grad for p in ema.parameters())
    clone = make_ema(_args("--model-ema"), model)
    clone.load_state_dict(ema.state_dict())
    torch.testing.assert_close(clone.module[0].weight, ema.module[0].weight)


def _step(model, accum, scaler=None, amp=None, lr=0.1):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    loss_fn = lambda logits, batch: nn.functional.cross_entropy(logits.float(), batch.labels)  # noqa: E731
    return TrainStep(model, model, loss_fn, opt, scaler=scaler, clip_grad=0.5, accum_steps=accum, amp_dtype=amp)


def _batch(x, y):
    return SimpleNamespace(images=x, labels=y, mix_box=None)


def test_grad_accumulation_equals_the_large_batch():
    """Two accumulated batches of 3 give the update of one batch of 6 (clip and weight decay included)."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % (1 << 31)))
    x, y = torch.randn(6, 5, generator=gen), torch.randint(0, 4, (6,), generator=gen)
    big, small = nn.Linear(5, 4), nn.Linear(5, 4)
    small.load_state_dict(big.state_dict())
    one, two = _step(big, 1), _step(small, 2)
    for step in range(3):
        one(_batch(x, y), step, 0, 1)
        before = small.weight.detach().clone()
        two(_batch(x[:3], y[:3]), step, 0, 2)
        assert torch.equal(small.weight, before)  # no update before the group ends
        two(_batch(x[3:], y[3:]), step, 1, 2)
        torch.testing.assert_close(small.weight, big.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(small.bias, big.bias, rtol=1e-5, atol=1e-6)
    assert one.optimizer.state[big.weight]["step"] == two.optimizer.state[small.weight]["step"] == 3


def test_fp16_grad_scaler_step():
    """--amp fp16: autocast to float16 and timm's NativeScaler (state in the checkpoint)."""
    model = nn.Linear(5, 4)
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            assert model(torch.randn(2, 5)).dtype == torch.float16
    except (RuntimeError, AssertionError) as err:
        pytest.skip(f"torch cannot autocast to float16 on this CPU: {err}")
    scaler = make_scaler(_args("--amp", "fp16"), torch.device("cpu"))
    assert make_scaler(_args("--amp", "bf16"), torch.device("cpu")) is None
    step = _step(model, 1, scaler=scaler, amp=torch.float16)
    before = model.weight.detach().clone()
    x, y = torch.randn(6, 5), torch.randint(0, 4, (6,))
    loss = step(_batch(x, y), 0, 0, 1)
    assert torch.isfinite(loss) and not torch.equal(model.weight, before)
    assert scaler.state_dict()["scale"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "10", "--grad-accum-steps", "3"], "does not split into --grad-accum-steps 3"),
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be at least 1"),
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--model", "resnet18", "--label-mode", "class", "--mixtoken"], "resnet18 has no token outputs"),
    (["--label-mode", "class", "--dense-weight", "0.5"], "--label-mode class trains the class output only"),
    (["--resume", "--initial-checkpoint", "x.pth"], "drop --initial-checkpoint"),
])
def test_argument_errors_are_one_line(argv, message, capsys):
    from tl_fast.train.config import apply_preset, check_args
    parser = build_parser("trainer")
    with pytest.raises(SystemExit) as exc:
        check_args(parser, apply_preset(parser.parse_args(argv)))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("trainer: error: ") and message in err[-1] and len(err) == 2, err


def test_checkpoint_atomic_and_roundtrip(tmp_path):
    path = tmp_path / "ck" / "last.pth"
    save_checkpoint(path, {"a": torch.arange(3), "b": 1})
    assert read_checkpoint(path)["b"] == 1

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"a": Boom()})
    assert read_checkpoint(path)["b"] == 1  # the previous checkpoint survives
    assert sorted(os.listdir(path.parent)) == ["last.pth"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="--resume"):
        read_checkpoint(tmp_path / "missing.pth")


def test_rng_state_roundtrip():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    assert step_seed(0, 0, 1) != step_seed(0, 1, 1) != step_seed(0, 0, 2)


def test_evaluate_top1_top5():
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 0], [0, 1, 2, 3, 4, 5, 9], [9, 8, 7, 6, 5, 4, 0]])
    labels = torch.tensor([0, 5, 6])  # top-1 hit, top-5 hit, miss
    batches = [(torch.arange(3)[:2], labels[:2]), (torch.arange(3)[2:], labels[2:])]
    res = evaluate(lambda idx: logits[idx], batches, device=torch.device("cpu"))
    assert res["top1"] == pytest.approx(100 / 3) and res["top5"] == pytest.approx(200 / 3) and res["count"] == 3
    both = evaluate({"": lambda idx: logits[idx], "ema_": lambda idx: logits[idx].roll(1, dims=1)}, batches, device=torch.device("cpu"))
    assert both["top1"] == res["top1"] and both["ema_top1"] == 0.0 and both["ema_count"] == 3


def test_logger_and_meter(tmp_path):
    log = JsonlLogger(tmp_path / "log.jsonl")
    log.log("train", step=1, loss=torch.tensor(0.5))
    log.log("epoch", top1=12.5)
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines] == ["train", "epoch"] and lines[0]["loss"] == 0.5
    JsonlLogger(None).log("ignored")  # non-zero ranks

    meter = ThroughputMeter(total_steps=10, world_size=2, skip=1)
    meter.start(0)
    assert math.isnan(meter.images_per_s) and math.isnan(meter.eta_s())
    for _ in range(4):
        meter.update(8)
    assert meter.images_per_s > 0 and meter.eta_s() >= 0 and meter.done == 4
    assert format_seconds(3725) == "1:02:05" and format_seconds(65) == "1:05" and format_seconds(float("nan")) == "?"


def test_mixed_label_loss_follows_the_box():
    from tl_fast.train import mix_lam, mixed_label_loss
    torch.manual_seed(5)
    logits, labels, k = torch.randn(4, 6), torch.tensor([0, 3, 5, 1]), 6
    box = torch.tensor([1, 0, 3, 2], dtype=torch.int32)  # 4 of 16 tokens: lam = 0.75
    assert torch.allclose(mix_lam(box, 4, (4, 4)), torch.full((4,), 0.75))
    # Same value as the soft-target loss against smoothed, mixed one-hot targets.
    onehot = torch.nn.functional.one_hot(labels, k).float() * 0.9 + 0.1 / k
    target = 0.75 * onehot + 0.25 * onehot.flip(0)
    expected = -(target * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(mixed_label_loss(logits, labels, box, (4, 4), 0.1), expected)
    per_sample = torch.tensor([[0, 0, 0, 0], [0, 0, 4, 4], [0, 0, 2, 2], [0, 0, 1, 1]])
    assert mix_lam(per_sample, 4, (4, 4)).tolist() == [1.0, 0.0, 0.75, 0.9375]
    torch.testing.assert_close(mixed_label_loss(logits, labels, None, (4, 4)),
                               torch.nn.functional.cross_entropy(logits, labels))


def _write_log(path):
    log = JsonlLogger(path / "log.jsonl")
    log.log("start", args={"model": "old", "token_label": "True"}, steps_per_epoch=4, world_size=1)
    log.log("train", epoch=0, step=1, loss=9.0, lr=0.1, images_per_s=float("nan"))  # an earlier run: not drawn
    log.log("start", args={"model": "lvvit_demo", "img_size": "32", "token_label": "True", "batch_size": "6"},
            steps_per_epoch=4, world_size=1)
    for step in range(1, 13):
        if step == 7:
            log.log("resume", step=6, epoch=1, batch_in_epoch=2, checkpoint=str(path / "last.pth"), steps_per_epoch=4)
        log.log("train", epoch=(step - 1) // 4, step=step, loss=2.0 / step, lr=0.01 * step,
                images_per_s=float("nan") if step % 4 == 1 else 100.0 + step)
        if step % 4 == 0:
            log.log("epoch", epoch=step // 4, top1=10.0 * step, ema_top1=8.0 * step, train_images_per_s=100.0)
    log.close()


def test_plot_run_draws_the_latest_run_and_its_resume(tmp_path):
    pytest.importorskip("matplotlib")
    from tl_fast.train.plot import plot_run, read_run
    _write_log(tmp_path)
    run = read_run(tmp_path / "log.jsonl")
    assert run["head"]["args"]["model"] == "lvvit_demo" and len(run["train"]) == 12
    assert [r["step"] for r in run["resumes"]] == [6] and len(run["evals"]) == 3
    png = plot_run(tmp_path)
    assert png == tmp_path / "curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    with Image.open(png) as im:
        assert im.width > 800 and im.height > 500


def test_plot_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from tl_fast.cli import main
    _write_log(tmp_path)
    out = tmp_path / "other.png"
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no log.jsonl"):
        main(["plot", str(tmp_path / "missing")])


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    from tl_fast.optional import MissingDependency
    from tl_fast.train.plot import plot_run
    _write_log(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(MissingDependency, match=r"tl-fast\[plot\]"):
        plot_run(tmp_path)


def test_train_entry_points_share_the_options(capsys):
    """``tl-fast train``, ``python -m tl_fast.train`` and examples/train_lvvit.py take the same options."""
    import subprocess
    from pathlib import Path

    from tl_fast.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    cli_help = capsys.readouterr().out
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    for cmd in ([sys.executable, "-m", "tl_fast.train", "--help"], [sys.executable, str(root / "examples" / "train_lvvit.py"), "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert out.returncode == 0, out.stderr
        for flag in ("--grad-accum-steps", "--opt", "--sched", "--amp", "--no-model-ema", "--initial-checkpoint",
                     "--torchcompile", "--channels-last", "--label-compat", "demo-cnn"):
            assert flag in out.stdout and flag in cli_help, (cmd, flag)


def test_token_models_are_named_types_and_the_loader_grid_is_the_models_total_stride():
    """VOLO has a forward_train but is no LV-ViT; wrapped, its loader grid is at stride 16 (not its stride-8
    patch embedding), Swin's at 32 (not its 4 px patches), a ViT's at its patch size; --label-mode class
    and hard labels leave the model as it is (one grid cell)."""
    import timm
    from timm.models.volo import VOLO

    from tl_fast.train.checks import InputError
    from tl_fast.train.factories import is_token_model, prepare_model, token_patch
    volo = VOLO(layers=[1, 1, 1, 1], embed_dims=[16, 32, 32, 32], num_heads=[1, 1, 1, 1], img_size=64, num_classes=3)
    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, img_size=64, embed_dim=8,
                             depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2)
    vit = timm.create_model("test_vit", num_classes=3, img_size=64)
    assert not is_token_model(volo) and is_token_model(lvvit_demo(num_classes=3))
    tokens = _args("--model", "test_vit")
    for model, stride in ((volo, 16), (swin, 32), (vit, vit.patch_embed.patch_size[0])):
        wrapped = prepare_model(model, tokens)
        assert is_token_model(wrapped) and wrapped.model is model
        assert token_patch(wrapped, 64, True) == stride
    for argv in (("--label-mode", "class"), ("--no-token-label",)):
        assert prepare_model(vit, _args("--model", "test_vit", *argv)) is vit
    assert token_patch(vit, 64, False) == 64
    # Fine-tuning from a run of other classes re-initializes the token head with the class head.
    from tl_fast.train.factories import classifier_keys
    assert set(classifier_keys(prepare_model(vit, tokens), "x.pth")) == {"head.weight", "head.bias", "aux_head.weight",
                                                                         "aux_head.bias"}
    with pytest.raises(InputError, match="--img-size 72: image size 72x72 gives no whole token grid"):
        token_patch(prepare_model(swin, tokens), 72, True)
    with pytest.raises(InputError, match="cannot train with token labels: .*num_classes=0.*--label-mode class"):
        prepare_model(timm.create_model("test_vit", num_classes=0), tokens)
