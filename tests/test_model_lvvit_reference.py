"""LV-ViT computes what it computed before the timm port.

``tests/data/lvvit_reference.json`` holds the outputs of the pre-port model (``tl_fast/models/lvvit.py``
at commit f104ce3, before LV-ViT became a timm model) for a small configuration, written once by
``reference_outputs`` below. Never regenerate it from the current code: its point is to stay put.

Its weights are not stored: every tensor is drawn from a generator seeded by the tensor's own name,
so any model that keeps the key layout gets exactly the same weights. The fixture also lists the old
keys and shapes, so this test loads a state dict in the old layout (which the public layout shares):
old checkpoints still load, also into a model built through ``timm.create_model``.
"""
import json
import zlib
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).parent / "data" / "lvvit_reference.json"
# A small lvvit_demo: 2 blocks, 32 px images (4x4 tokens), 5 classes.
CONFIG = {"num_classes": 5, "img_size": 32, "depth": 2}
BOX = [1, 0, 3, 2]  # MixToken box (r1, c1, r2, c2) in token units


def seeded_state(shapes: dict) -> dict:
    """A state dict whose every tensor depends only on its name and shape (not on module init order)."""
    state = {}
    for name, shape in shapes.items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(10)
            continue
        r = torch.randn(shape, generator=g, dtype=torch.float64)
        if name.endswith("running_var"):
            t = 0.5 + r.abs()
        elif name.endswith("running_mean") or name.endswith(".bias"):
            t = 0.1 * r
        elif len(shape) == 1:  # norm scales
            t = 1.0 + 0.1 * r
        elif name in ("pos_embed", "cls_token"):
            t = 0.5 * r
        else:  # linear / conv weights: unit-variance outputs
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = r / fan_in ** 0.5
        state[name] = t.float()
    return state


def seeded_inputs() -> dict:
    g = torch.Generator().manual_seed(1234)
    return {size: torch.randn(2, 3, size, size, generator=g) for size in (32, 48, 16)}


@torch.no_grad()
def reference_outputs(model: torch.nn.Module) -> dict:
    x = seeded_inputs()
    cls, tok = model.forward_train(x[32])
    mix_cls, mix_tok = model.forward_train(x[32], torch.tensor(BOX, dtype=torch.int32))
    return {"logits": model(x[32]), "cls_logits": cls, "token_logits": tok,
            "mix_cls_logits": mix_cls, "mix_token_logits": mix_tok,
            "logits_48px": model(x[48]),  # position embedding upsampled
            "logits_16px": model(x[16])}  # and downsampled


def _load_fixture() -> dict:
    return json.loads(FIXTURE.read_text())


def _check(model: torch.nn.Module, fixture: dict) -> None:
    from tl_fast.models import load_checkpoint

    load_checkpoint(model, seeded_state({k: tuple(v) for k, v in fixture["state_dict_shapes"].items()}))
    out = reference_outputs(model.eval())
    assert set(out) == set(fixture["outputs"])
    for key, values in fixture["outputs"].items():
        want = torch.tensor(values, dtype=torch.float32).view(out[key].shape)
        torch.testing.assert_close(out[key], want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_outputs_match_the_frozen_pre_port_model():
    from tl_fast.models import create_lvvit

    _check(create_lvvit("lvvit_demo", **CONFIG), _load_fixture())


def test_timm_create_model_matches_the_frozen_pre_port_model():
    timm = pytest.importorskip("timm")
    import tl_fast.models  # noqa: F401  (registers LV-ViT with timm)

    _check(timm.create_model("lvvit_demo", **CONFIG), _load_fixture())


def test_fixture_is_sensitive():
    """The comparison would catch a change: a single perturbed weight moves the outputs."""
    from tl_fast.models import create_lvvit, load_checkpoint

    fixture = _load_fixture()
    state = seeded_state({k: tuple(v) for k, v in fixture["state_dict_shapes"].items()})
    state["blocks.1.attn.qkv.weight"][0, 0] += 0.05
    model = load_checkpoint(create_lvvit("lvvit_demo", **CONFIG), state).eval()
    out = reference_outputs(model)
    want = torch.tensor(fixture["outputs"]["logits"]).view(out["logits"].shape)
    assert (out["logits"] - want).abs().max() > 1e-4
