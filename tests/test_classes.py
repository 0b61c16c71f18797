"""Class ids matched by name (issue 27): a val split lacking a class is scored with the train split's
ids, a class train lacks is an error, and a label store that records other classes than its image
folder is refused, on every backend."""
from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest

from test_loader_helpers import make_folder, make_store
from tl_fast.classes import ClassMismatch, match_classes, same_classes
from tl_fast.loaders import TokenLabelLoader
from tl_fast.store import LabelStore, StoreWriter

S, P = 32, 8
TRAIN = ["a_cat", "b_dog", "c_owl"]


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def test_match_and_same_classes_name_the_differences():
    ids, lacking = match_classes(["b", "c"], ["a", "b", "c"], what="val", reference_what="train")
    assert ids.tolist() == [1, 2] and lacking == ["a"]
    with pytest.raises(ClassMismatch, match="val has 1 class\\(es\\) that train lacks: 'z'") as err:
        match_classes(["b", "z"], ["a", "b", "c"], what="val", reference_what="train")
    assert "\n" not in str(err.value)
    same_classes(["a", "b"], ["a", "b"], what="x", reference_what="y", remedy="r")
    with pytest.raises(ClassMismatch, match="'c' only in x; 'b' only in y; its class ids would mean other classes: r"):
        same_classes(["a", "c"], ["a", "b"], what="x", reference_what="y", remedy="r")
    with pytest.raises(ClassMismatch, match="another order \\(id 0 is 'b' in x, 'a' in y\\)"):
        same_classes(["b", "a"], ["a", "b"], what="x", reference_what="y", remedy="r")


@pytest.fixture(scope="module")
def val_without_first(tmp_path_factory):
    """A val folder holding every train class but the first (which sorts before the others)."""
    from tl_fast.loaders.ffcv_pack import pack_ffcv

    root = tmp_path_factory.mktemp("classes")
    val = make_folder(root / "val", {c: 3 for c in TRAIN[1:]}, seed=1)
    _quiet(pack_ffcv, val, None, str(root / "val.beton"), num_workers=1, progress=False)
    return {"val": val, "beton": str(root / "val.beton")}


@pytest.mark.parametrize("backend", ["torch", "dali", "ffcv"])
def test_val_split_without_the_first_class_gets_the_train_ids(val_without_first, backend):
    images = val_without_first["beton" if backend == "ffcv" else "val"]
    kw = dict(backend=backend, batch_size=2, image_size=S, patch_size=P, num_workers=1 if backend != "torch" else 0,
              device="cpu", train=False, drop_last=False)
    own = _quiet(TokenLabelLoader, images, None, **kw)  # its own class list: ids 0 and 1
    with pytest.warns(UserWarning, match="has no images of 1 of the 3 classes \\(a_cat\\)"):
        loader = TokenLabelLoader(images, None, classes=TRAIN, **kw)
    assert loader.classes == TRAIN and loader.num_classes == 3 and loader.lacking_classes == ["a_cat"]
    labels = np.concatenate([b.labels.numpy() for b in loader])
    assert np.array_equal(labels, np.concatenate([b.labels.numpy() for b in own]) + 1)  # b_dog is 1, c_owl 2
    assert all(b.num_classes == 3 for b in loader)


@pytest.mark.parametrize("backend", ["torch", "ffcv"])
def test_val_class_that_train_lacks_is_a_one_line_error(val_without_first, backend):
    images = val_without_first["beton" if backend == "ffcv" else "val"]
    with pytest.raises(ClassMismatch, match="has 1 class\\(es\\) that the class list given lacks: 'c_owl'") as err:
        _quiet(TokenLabelLoader, images, None, backend=backend, batch_size=2, image_size=S, patch_size=P,
               num_workers=1 if backend == "ffcv" else 0, device="cpu", train=False, classes=["a_cat", "b_dog"])
    assert "\n" not in str(err.value)


def test_loader_with_token_labels_needs_exactly_the_classes_given(tmp_path):
    root = make_folder(tmp_path / "imgs", {c: 2 for c in TRAIN})
    store = _quiet(make_store, root, tmp_path / "labels.tls")
    kw = dict(backend="torch", batch_size=2, image_size=S, patch_size=P, num_workers=0, device="cpu")
    assert _quiet(TokenLabelLoader, root, store, classes=TRAIN, **kw).classes == TRAIN
    with pytest.raises(ClassMismatch, match="label maps keep the store's ids"):
        _quiet(TokenLabelLoader, root, store, classes=["a_cat", "b_dog", "c_owl", "d_emu"], **kw)


def _store_with_classes(images, path, classes) -> str:
    """make_store's store, with the class list its ids mean recorded as annotate records it."""
    tmp = make_store(images, str(path) + ".plain")
    with LabelStore.open(tmp) as src, StoreWriter(path, num_classes=src.num_classes, topk=src.topk,
                                                  map_size=src.map_size, metadata={"classes": classes}) as w:
        w.copy_from(src)
    os.unlink(tmp)
    return str(path)


def test_store_recording_other_classes_than_the_folder_is_refused_everywhere(tmp_path, capsys):
    """A renamed class folder keeps the class count, so the count check passed and every id of the
    store meant another class; the store's recorded class list catches it (join, pack-ffcv, FFCV)."""
    from tl_fast.cli import main
    from tl_fast.loaders.ffcv_pack import pack_ffcv

    root = make_folder(tmp_path / "imgs", {c: 2 for c in TRAIN})
    store = _quiet(_store_with_classes, root, tmp_path / "labels.tls", TRAIN)
    kw = dict(batch_size=2, image_size=S, patch_size=P, num_workers=0, device="cpu")
    assert _quiet(TokenLabelLoader, root, store, backend="torch", **kw).num_classes == 3
    beton = str(tmp_path / "x.beton")
    _quiet(pack_ffcv, root, store, beton, num_workers=1, progress=False)
    shutil.move(os.path.join(root, "a_cat"), os.path.join(root, "a_cow"))  # same count, another class
    with pytest.raises(ClassMismatch, match="'a_cow' only in .*'a_cat' only in the label store"):
        _quiet(TokenLabelLoader, root, store, backend="torch", **kw)
    capsys.readouterr()
    assert main(["pack-ffcv", root, store, str(tmp_path / "y.beton")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tl-fast pack-ffcv: error:") and "'a_cow' only in" in err and "\n" not in err
    assert main(["inspect", store, "--verify", root]) == 1
    out = capsys.readouterr().out
    assert "'a_cow' only in" in out and "does NOT match" in out
    other = _quiet(_store_with_classes, root, tmp_path / "other.tls", ["a_cow", "b_dog", "c_owl"])
    with pytest.raises(ClassMismatch, match="'a_cat' only in .*x.beton"):
        _quiet(TokenLabelLoader, beton, other, backend="ffcv", **{**kw, "num_workers": 1})


def test_annotate_records_the_class_list_its_ids_mean(tmp_path):
    from tl_fast.annotate import annotate
    from tl_fast.demo.annotator import DemoCNN

    root = make_folder(tmp_path / "imgs", {c: 2 for c in TRAIN})
    _quiet(annotate, root, tmp_path / "k.tls", model=DemoCNN(num_classes=3, width=4).eval(), img_size=32, topk=2,
           num_workers=0, progress=False)
    assert LabelStore.open(tmp_path / "k.tls").metadata["classes"] == TRAIN
