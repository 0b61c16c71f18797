"""tl_fast.train building blocks: parameter groups, schedule, EMA, checkpoints, evaluation, logging."""
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from tl_fast.models import lvvit_demo
from tl_fast.train import (
    JsonlLogger, ModelEma, ThroughputMeter, cosine_factor, cosine_schedule, evaluate, format_seconds,
    load_checkpoint, param_groups, rng_state, save_checkpoint, scaled_lr, set_rng_state, step_seed,
)


def test_param_groups_exempt_norms_biases_pos_cls():
    model = lvvit_demo(num_classes=5, img_size=32)
    decay, rest = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    rest_names = {names[id(p)] for p in rest["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias", "patch_embed.bn1.weight",
            "blocks.0.norm1.weight", "blocks.0.attn.proj.bias"} <= rest_names
    assert {"blocks.0.attn.qkv.weight", "head.weight", "aux_head.weight", "patch_embed.conv1.weight"} <= decay_names
    assert len(decay_names) + len(rest_names) == len(list(model.parameters()))


def test_cosine_factor_shape():
    f = [cosine_factor(s, 100, 10, min_ratio=0.1) for s in range(100)]
    assert f[9] == pytest.approx(1.0) and f[0] < 0.2
    assert all(a < b for a, b in zip(f[:9], f[1:10]))  # warm-up rises
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then decays
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine_factor(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert scaled_lr(1.6e-3, 512) == pytest.approx(8e-4)


def test_cosine_schedule_resumes():
    def make():
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, cosine_schedule(opt, 50, 5)
    opt, sched = make()
    for _ in range(17):
        opt.step()
        sched.step()
    opt2, sched2 = make()
    sched2.load_state_dict(sched.state_dict())
    opt2.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"] == pytest.approx(cosine_factor(18, 50, 5, 0.01, 0.001))


def test_ema_tracks_and_warms_up():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.9)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, before + 0.9)  # (1 - 0.1) of the step
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    for _ in range(200):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(0.9)
    torch.testing.assert_close(ema.module[0].weight, model[0].weight)
    assert not any(p.requires_grad for p in ema.parameters())
    clone = ModelEma(model, decay=0.9)
    clone.load_state_dict(ema.state_dict())
    assert int(clone.num_updates) == 201


def test_checkpoint_atomic_and_roundtrip(tmp_path):
    path = tmp_path / "ck" / "last.pth"
    save_checkpoint(path, {"a": torch.arange(3), "b": 1})
    assert load_checkpoint(path)["b"] == 1

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"a": Boom()})
    assert load_checkpoint(path)["b"] == 1  # the previous checkpoint survives
    assert sorted(os.listdir(path.parent)) == ["last.pth"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="--resume"):
        load_checkpoint(tmp_path / "missing.pth")


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


def test_content_mixtoken_weighs_the_class_target_by_visible_class():
    """Token rows as SPEC's MixToken; the class row reduces to the area rule when every token shows its
    image's class, and gives no weight to an image whose class tokens the box covers entirely."""
    from tl_fast.ops.class_loss import content_mixtoken
    from tl_fast.ops.reference import apply_mixtoken

    b, grid, k = 4, (4, 4), 5
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % (1 << 31)))
    targets = torch.rand(b, 17, k, generator=gen).softmax(-1)
    box = torch.tensor([1, 0, 3, 2])  # 2 x 2 tokens: lam = 0.75
    got = content_mixtoken(targets, box, grid)
    area = apply_mixtoken(targets, box, grid)
    torch.testing.assert_close(got[:, 1:], area[:, 1:])
    labels = torch.tensor([0, 1, 2, 3])
    onehot = torch.nn.functional.one_hot(labels, k).float().view(b, 1, k).expand(b, 17, k).contiguous()
    torch.testing.assert_close(content_mixtoken(onehot, box, grid), apply_mixtoken(onehot, box, grid))
    # Sample 0's class only on the 4 tokens the box covers: its class target comes wholly from sample 3.
    own = onehot.clone()
    own[0, 1:] = torch.nn.functional.one_hot(torch.tensor(4), k).float()
    for r, c in ((1, 0), (1, 1), (2, 0), (2, 1)):
        own[0, 1 + r * 4 + c] = onehot[0, 0]
    torch.testing.assert_close(content_mixtoken(own, box, grid)[0, 0], own[3, 0])
