"""``tl-fast convert-pt`` on both published per-image layouts, written here the way each project writes them.

TokenLabeling (zihangJiang/TokenLabeling, generate_label.py): per image, the top-k of ``[H, W, K]``
logits, stacked as float16 and permuted to ``[2, k, H, W]``. ReLabel (naver-ai/relabel_imagenet):
``[2, 5, 15, 15]`` float32 (scores, class ids). Both: ``<class>/<image name up to its first '.'>.pt``.
"""
from __future__ import annotations

import pytest
import torch

from tl_fast.cli import main
from tl_fast.store import LabelStore

NAMES = {"n01": ["n01_7.JPEG", "n01_12.JPEG"], "n02": ["n02_3.JPEG", "n02_5.v2.JPEG"]}


def _stem(name: str) -> str:
    return name.split(".")[0]


def write_tokenlabeling(root, num_classes=30, size=(6, 7), k=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    written = {}
    for cls, names in NAMES.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            logits = torch.randn(*size, num_classes, generator=gen) * 4  # [H, W, K]
            value, index = logits.topk(k)
            t = torch.stack([value.half(), index.half()]).permute(0, 3, 1, 2)  # [2, k, H, W]
            torch.save(t, root / cls / f"{_stem(name)}.pt")
            written[f"{cls}/{_stem(name)}"] = t
    return written


def write_relabel(root, num_classes=1000, seed=1):
    gen = torch.Generator().manual_seed(seed)
    written = {}
    for cls, names in NAMES.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            value, index = (torch.randn(15, 15, num_classes, generator=gen) * 3).topk(5)
            t = torch.stack([value, index.float()]).permute(0, 3, 1, 2).contiguous()  # [2, 5, 15, 15] float32
            torch.save(t, root / cls / f"{_stem(name)}.pt")
            written[f"{cls}/{_stem(name)}"] = t
    return written


@pytest.mark.parametrize("layout", ["tokenlabeling", "relabel"])
@pytest.mark.parametrize("given", [False, True], ids=["detected", "given"])
def test_convert_reads_each_layout(tmp_path, capsys, layout, given):
    src = tmp_path / layout
    written = (write_tokenlabeling if layout == "tokenlabeling" else write_relabel)(src)
    dst = tmp_path / "labels.tls"
    args = ["convert-pt", str(src), str(dst), "--quiet"] + (["--layout", layout] if given else [])
    assert main(args) == 0
    assert f"from the {layout} layout" in capsys.readouterr().out
    store = LabelStore.open(dst)
    assert store.metadata["layout"] == layout and sorted(store.keys) == sorted(written)
    first = next(iter(written.values()))
    assert (store.topk, *store.map_size) == tuple(first.shape[1:])
    maps = store.read(store.lookup(list(written)))
    for j, t in enumerate(written.values()):
        assert torch.equal(maps.values[j].float(), t[0].half().float())  # scores kept as float16
        assert torch.equal(maps.indices[j].long(), t[1].long())


def test_relabel_class_ids_above_2048_are_exact(tmp_path):
    src = tmp_path / "relabel"
    written = write_relabel(src, num_classes=5000, seed=3)
    assert max(int(t[1].max()) for t in written.values()) > 2048
    dst = tmp_path / "r.tls"
    assert main(["convert-pt", str(src), str(dst), "--quiet", "--num-classes", "5000"]) == 0
    store = LabelStore.open(dst)
    maps = store.read(store.lookup(list(written)))
    assert all(torch.equal(maps.indices[j].long(), t[1].long()) for j, t in enumerate(written.values()))


def test_wrong_or_mixed_layout_is_an_error_naming_the_file(tmp_path, capsys):
    src = tmp_path / "tl"
    write_tokenlabeling(src)
    assert main(["convert-pt", str(src), str(tmp_path / "a.tls"), "--quiet", "--layout", "relabel"]) == 1
    err = capsys.readouterr().err
    assert "float16" in err and "relabel" in err and ".pt" in err
    # one ReLabel-style file among TokenLabeling ones
    torch.save(torch.zeros(2, 5, 6, 7), src / "n02" / "zz_float32.pt")
    assert main(["convert-pt", str(src), str(tmp_path / "b.tls"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "zz_float32.pt" in err and "mixes layouts" in err
    # a dtype neither layout uses
    other = tmp_path / "f64"
    (other / "c").mkdir(parents=True)
    torch.save(torch.zeros(2, 2, 3, 3, dtype=torch.float64), other / "c" / "x.pt")
    assert main(["convert-pt", str(other), str(tmp_path / "c.tls"), "--quiet"]) == 1
    assert "no known layout" in capsys.readouterr().err
    assert not any(p.suffix == ".tls" for p in tmp_path.iterdir())


def test_help_names_both_layouts(capsys):
    with pytest.raises(SystemExit):
        main(["convert-pt", "--help"])
    text = capsys.readouterr().out
    assert "relabel" in text and "tokenlabeling" in text
