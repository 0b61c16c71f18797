"""``label_compat="official"`` against a restatement of the official TokenLabeling target path.

The restatement below is written from reading zihangJiang/TokenLabeling ``tlt/data`` (the dataset,
``label_transforms_factory.py`` and ``mixup.py``, which adapts ReLabel's LabelPooling): the sample's
label map ``[2, k, H, W]`` is flipped with the image before the crop; the crop's coordinates are
kept as ``(top/H, left/W, h/H, w/W)`` of the flipped image and turned into ``(y1, x1, y2, x2)``; the
dense map is a float32 scatter of the top-k scores; ``roi_align`` gets those coordinates times the
map's width minus 0.5 (``aligned=False``, adaptive sampling) for the token grid and for one bin;
the class scores are soft-maxed and smoothed with ``on = 1 - s + s/K``, ``off = s/K``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import roi_align

from tl_fast import compat, ops
from tl_fast.dataset import ImageFolderIndex, join_labels
from tl_fast.plan import AugmentConfig, plan_batch
from tl_fast.store import LabelStore, StoreWriter


def official_targets(values, indices, box, flip, *, num_classes, label_size, smoothing, swap=True):
    """``[B, 1 + G*G, K]`` (class token first) by the official path; ``swap=False`` passes the crop to
    ``roi_align`` in the order it reads, ``(x1, y1, x2, y2)`` (the fixed official code)."""
    bsz, k, h, w = values.shape
    files = torch.stack([values.float(), indices.float()], 1)  # [B, 2, k, H, W]: the label files, loaded .float()
    coords = []
    for b in range(bsz):
        x1, y1, x2, y2 = (float(c) for c in box[b])
        if flip[b]:  # RandomHorizontalFlipWithLabel comes before the crop: image and map flip together
            files[b] = files[b].flip(-1)
            x1, x2 = 1.0 - x2, 1.0 - x1  # the same pixels, cropped from the flipped image
        # RandomResizedCropAndInterpolationWithCoords: (i / H, j / W, h / H, w / W), then [:, 2:] += [:, :2]
        top, left, ch, cw = y1, x1, y2 - y1, x2 - x1
        coords.append([top, left, top + ch, left + cw] if swap else [left, top, left + cw, top + ch])
    coords = torch.tensor(coords, dtype=torch.float32)
    dense = torch.zeros(bsz, num_classes, h, w)
    for b in range(bsz):  # get_featuremaps
        dense[b].scatter_(0, files[b, 1].long(), files[b, 0])
    rois = torch.cat([torch.arange(bsz, dtype=torch.float32)[:, None], coords * w - 0.5], 1)
    tokens = roi_align(dense, rois, output_size=(label_size, label_size))  # get_label
    cls = roi_align(dense, rois, output_size=(1, 1))
    scores = torch.cat([cls.view(bsz, num_classes, 1), tokens.view(bsz, num_classes, -1)], 2)
    t = scores.softmax(1)
    off = smoothing / num_classes
    t = t * (1.0 - smoothing + off) + off  # mixup_target's on / off values
    return t.transpose(1, 2)  # tl_fast's layout [B, 1 + T, K]


def random_maps(bsz, k, h, w, num_classes, seed):
    gen = torch.Generator().manual_seed(seed)
    values = (torch.randn(bsz, k, h, w, generator=gen) * 2.5 + 1.0).half()
    ids = torch.rand(bsz * h * w, num_classes, generator=gen).topk(k, dim=1).indices
    return values, ids.view(bsz, h, w, k).permute(0, 3, 1, 2).to(torch.int16).contiguous()


def crop_flip_plan(bsz, seed):
    # Prime image sides: a crop whose extent is a whole number of map pixels would make roi_align's
    # float32 rounding pick the sample count (docs/spec.md section 3: tl_fast rounds such an extent down).
    sizes = np.stack([np.full(bsz, 307), np.full(bsz, 421)], 1)
    plan = plan_batch(seed, 0, np.arange(bsz), sizes, AugmentConfig(randaugment=None, scale=(0.05, 1.0)))
    assert plan.flip.any() and not plan.flip.all()
    return plan


@pytest.mark.parametrize("map_size", [(12, 12), (9, 14)], ids=["square", "nonsquare_map"])
def test_official_affine_and_smoothing_reproduce_the_official_targets(map_size):
    bsz, k, num_classes, grid, s = 8, 4, 53, 4, 0.1
    values, indices = random_maps(bsz, k, *map_size, num_classes, seed=2)
    plan = crop_flip_plan(bsz, seed=5)
    want = official_targets(values, indices, plan.box, plan.flip, num_classes=num_classes, label_size=grid,
                            smoothing=s)
    affine = torch.from_numpy(compat.official_crop_flip_affine(plan.box, plan.flip, map_size)).float()
    s_equiv, scale = compat.official_smoothing(s, num_classes)
    got = ops.token_targets(values, indices, affine, num_classes=num_classes, grid=(grid, grid),
                            smoothing=s_equiv) * scale
    assert (got - want).abs().max().item() < 2e-6
    assert torch.allclose(got.sum(-1), torch.full((bsz, 1 + grid * grid), 1 + s / num_classes), atol=1e-5)
    cls = ops.class_targets(values, indices, affine, num_classes=num_classes, smoothing=s, smoothing_rule="official")
    assert (cls - want[:, 0]).abs().max().item() < 2e-6
    if map_size[0] != map_size[1]:
        return  # the official code scales rows by the map's width too: only square maps can be fixed by the order
    # The fix: the official code with the box in roi_align's order gives tl_fast's region (own smoothing aside)
    fixed = official_targets(values, indices, plan.box, plan.flip, num_classes=num_classes, label_size=grid,
                             smoothing=s, swap=False)
    ours = ops.token_targets(values, indices, torch.from_numpy(plan.affine).float(), num_classes=num_classes,
                             grid=(grid, grid), smoothing=s_equiv) * scale
    assert (ours - fixed).abs().max().item() < 2e-6
    assert (ours - want).abs().max().item() > 0.05  # and the official region differs on these non-square crops


def test_official_smoothing_identity():
    s, k = 0.1, 7
    keep, spread = compat.smoothing_terms(s, k, "official")
    s2, c = compat.official_smoothing(s, k)
    t = torch.rand(5, k).softmax(-1)
    assert torch.allclose(keep * t + spread, c * ((1 - s2) * t + s2 / k), atol=1e-7)
    assert compat.smoothing_terms(s, k) == (1 - s, s / k)
    with pytest.raises(ValueError, match="label_compat"):
        compat.smoothing_terms(s, k, "timm")


# ----------------------------------------------------------------------------------------------
# the loader under label_compat="official"
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from test_loader_helpers import make_folder, make_store

    root = tmp_path_factory.mktemp("compat")
    images = make_folder(root / "images")
    return {"images": images, "store": make_store(images, root / "labels.tls", topk=3, map_size=(6, 6))}


def _loader(data, **kw):
    from tl_fast.loaders import TokenLabelLoader

    return TokenLabelLoader(data["images"], data["store"], backend="torch", batch_size=6, image_size=32,
                            patch_size=8, num_workers=0, device="cpu", augment=AugmentConfig(randaugment=None),
                            **kw)


@pytest.mark.parametrize("label_mode", ["tokens", "class"])
def test_loader_official_batches_follow_the_official_path(data, label_mode):
    loader = _loader(data, label_compat="official", label_mode=label_mode, mixtoken=False, seed=4)
    b = next(iter(loader))
    plan = loader.plan_maker(0)(b.indices)
    assert b.label_compat == "official" and b.mix_box is None
    want_affine = compat.official_crop_flip_affine(plan.box, plan.flip, (6, 6))
    assert torch.allclose(b.affine, torch.from_numpy(want_affine).float())
    want = official_targets(b.maps.values, b.maps.indices, plan.box, plan.flip, num_classes=b.num_classes,
                            label_size=4, smoothing=0.1)
    assert (b.class_targets() - want[:, 0]).abs().max().item() < 2e-6
    z = torch.randn(len(b), b.num_classes)
    expected_cls = -(want[:, 0] * z.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(b.loss(z), expected_cls, atol=1e-6)
    if label_mode == "tokens":
        assert (b.token_targets() - want).abs().max().item() < 2e-6
        tok = torch.randn(len(b), 16, b.num_classes)
        expected = expected_cls + (-(want[:, 1:] * tok.log_softmax(-1)).sum(-1).mean())
        for fused in (True, False):
            assert torch.allclose(b.loss(z, tok, fused=fused), expected, atol=1e-5)
    default = next(iter(_loader(data, label_mode=label_mode, mixtoken=False, seed=4)))
    assert default.label_compat == "tl_fast" and torch.equal(default.images, b.images)  # images are untouched


def test_loader_rejects_unknown_compat(data):
    with pytest.raises(ValueError, match="label_compat"):
        _loader(data, label_compat="timm")


# ----------------------------------------------------------------------------------------------
# the official label-file key rule
# ----------------------------------------------------------------------------------------------

def _folder(root, names):
    for rel in names:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 16), (90, 30, 160)).save(path)
    return ImageFolderIndex(root, progress=False)


def _store(path, keys, num_classes=2):
    with StoreWriter(path, num_classes=num_classes, topk=1, map_size=(2, 2)) as w:
        for j, key in enumerate(keys):
            w.add(key, np.full((1, 2, 2), j, np.float16), np.zeros((1, 2, 2), np.int64))
    return LabelStore.open(path)


def test_official_key_rule():
    assert compat.official_key("n01/a.b.JPEG") == "n01/a" and compat.official_key("a.b.c") == "a"
    assert compat.official_key("n01/n01_12.JPEG") == "n01/n01_12"


def test_join_accepts_official_keys_beside_tl_fast_keys(tmp_path):
    index = _folder(tmp_path / "img", ["n01/a.b.JPEG", "n01/c.JPEG", "n02/d.v2.png"])
    assert index.keys == ["n01/a.b", "n01/c", "n02/d.v2"]
    official = _store(tmp_path / "off.tls", ["n01/a", "n01/c", "n02/d"])  # as convert-pt keys official files
    join = join_labels(index, official)
    assert [official.keys[r] for r in join.record] == ["n01/a", "n01/c", "n02/d"]
    full = _store(tmp_path / "full.tls", ["n01/a.b", "n01/c", "n02/d.v2", "n01/a"])  # tl_fast's own key wins
    assert [full.keys[r] for r in join_labels(index, full).record] == ["n01/a.b", "n01/c", "n02/d.v2"]


@pytest.mark.parametrize("names", [["n01/a.b.JPEG", "n01/a.c.JPEG", "n02/e.JPEG"],
                                   ["n01/a.JPEG", "n01/a.b.JPEG", "n02/e.JPEG"]], ids=["two_dotted", "plain_and_dotted"])
def test_join_ambiguous_official_key_is_an_error_naming_both(tmp_path, names):
    index = _folder(tmp_path / "img", names)
    store = _store(tmp_path / "s.tls", ["n01/a", "n02/e"])
    with pytest.raises(ValueError, match="first '.'") as err:
        join_labels(index, store)
    assert names[0] in str(err.value) and names[1] in str(err.value)


def test_trainer_flag():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_lvvit.py"
    spec = importlib.util.spec_from_file_location("train_lvvit_compat", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build_parser().parse_args(["--label-compat", "official"]).label_compat == "official"
    assert mod.build_parser().parse_args([]).label_compat == "tl_fast"
