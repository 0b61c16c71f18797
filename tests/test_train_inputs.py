"""The trainer's input errors are one line naming the flag or file and what to do, with no
traceback; class ids travel by name from train to val and with every checkpoint (issue 27).

Runs the trainer in-process on test_train_lvvit's tiny 3-class dataset (a copy per test where the
test changes it)."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train_lvvit import _args, dataset  # noqa: F401  (a fixture)
from tl_fast.store import StoreWriter
from tl_fast.train.main import main

CLASSES = ["c0", "c1", "c2"]


def _error(argv, capsys) -> str:
    """The trainer's stderr for ``argv``: exit status 2 and one ``error:`` line, no traceback."""
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit) as exc:
            main(argv, prog="trainer")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("trainer: error: "), err
    return last


def _store(path: Path, classes, num_classes: int | None = None, per_class: int = 8) -> str:
    """A store with one flat map per train image of ``classes`` (the tiny dataset's names)."""
    ids = np.stack([np.zeros((6, 6), np.int64), np.ones((6, 6), np.int64)])
    with StoreWriter(path, num_classes=num_classes or len(classes), topk=2, map_size=(6, 6)) as w:
        for c in classes:
            for i in range(per_class):
                w.add(f"{c}/{i}", np.ones((2, 6, 6), np.float16), ids)
    return str(path)


def _with_labels(argv: list[str], labels: str) -> list[str]:
    i = argv.index("--labels")
    return argv[:i + 1] + [labels] + argv[i + 2:]


def _copy(data: Path, dst: Path) -> Path:
    shutil.copytree(data, dst, ignore=shutil.ignore_patterns(".tl_fast_*", "*.beton*"))
    return dst


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):  # noqa: F811
    """One epoch on the tiny dataset: its output folder (last.pth, best.pth)."""
    out = tmp_path_factory.mktemp("trained")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(_args(dataset, out, "torch", "--epochs", "1"))
    return out


def test_checkpoints_carry_the_train_class_list(trained):
    for name in ("last.pth", "best.pth"):
        assert torch.load(trained / name, weights_only=False)["classes"] == CLASSES


def test_val_split_without_the_first_class_is_scored_with_the_train_ids(dataset, tmp_path):  # noqa: F811
    """Removing val/c0 used to shift every val id by one (c1 scored as c0): a top-1 that meant
    nothing. Val is now scored with train's ids, matched by name, and the run says what val lacks."""
    from tl_fast.loaders import TokenLabelLoader

    data = _copy(dataset, tmp_path / "data")
    shutil.rmtree(data / "val" / "c0")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="has no images of 1 of the 3 classes \\(c0\\)"):
        result = main(_args(data, out, "torch", "--epochs", "3", "--no-model-ema"))
    # The same top-1, computed apart: the model's predictions against each image's class by name.
    model_args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    from tl_fast.models import create_lvvit

    model = create_lvvit("lvvit_demo", **model_args).eval()
    model.load_state_dict(torch.load(out / "last.pth", weights_only=False)["model"])
    val = TokenLabelLoader(data / "val", None, backend="torch", batch_size=6, image_size=32, patch_size=8,
                           num_workers=0, device="cpu", train=False, drop_last=False)
    right = total = 0
    with torch.no_grad():
        for b in val:
            names = [val.index.paths[i].split("/")[0] for i in b.indices]
            truth = torch.tensor([CLASSES.index(n) for n in names])
            right += int((model(b.images).argmax(1) == truth).sum())
            total += len(truth)
    assert total == 8 and result["count"] == 8
    assert result["top1"] == pytest.approx(100.0 * right / total)


def test_val_class_that_train_lacks_is_one_line(dataset, tmp_path, capsys):  # noqa: F811
    data = _copy(dataset, tmp_path / "data")
    shutil.copytree(data / "val" / "c1", data / "val" / "c1_renamed")
    err = _error(_args(data, tmp_path / "out", "torch", "--epochs", "1"), capsys)
    assert "val has 1 class(es) that the class list given lacks: 'c1_renamed'" in err


def test_resume_errors_are_one_line(dataset, trained, tmp_path, capsys):  # noqa: F811
    err = _error(_args(dataset, tmp_path / "fresh", "torch", "--epochs", "2", "--resume"), capsys)
    assert f"no checkpoint at {tmp_path / 'fresh' / 'last.pth'}" in err
    good = (trained / "last.pth").read_bytes()
    for name, raw, said in (("cut", good[: len(good) // 2], "PytorchStreamReader"),
                            ("garbage", b"\x80\x03not a checkpoint" * 10, "UnpicklingError")):
        out = tmp_path / name
        out.mkdir()
        (out / "last.pth").write_bytes(raw)
        err = _error(_args(dataset, out, "torch", "--epochs", "2", "--resume"), capsys)
        assert f"--resume: {out / 'last.pth'} is damaged or not a checkpoint (" in err and said in err, err
        assert "move it aside" in err and "drop --resume" in err
    err = _error(_args(dataset, tmp_path / "wide", "torch", "--epochs", "2", "--dim", "64", "--resume",
                       str(trained / "last.pth")), capsys)
    assert f"--resume: {trained / 'last.pth'} does not fit this run" in err


def test_resume_from_a_checkpoint_of_other_classes_is_one_line(dataset, trained, tmp_path, capsys):  # noqa: F811
    data = _copy(dataset, tmp_path / "data")
    for split in ("train", "val"):
        shutil.rmtree(data / split / "c2")
    argv = _with_labels(_args(data, trained, "torch"), _store(tmp_path / "two.tls", ["c0", "c1"]))
    err = _error(argv + ["--epochs", "2", "--resume"], capsys)
    assert "the train split has 2 classes and" in err and "'c2' only in" in err and "resume with the data" in err


def test_batch_larger_than_the_dataset_is_one_line(dataset, tmp_path, capsys):  # noqa: F811
    err = _error(_args(dataset, tmp_path / "out", "torch", "--epochs", "1", "--batch-size", "30"), capsys)
    assert "--batch-size 30 is larger than the train split (24 usable images" in err


def test_image_size_that_gives_no_whole_token_grid_is_one_line(dataset, tmp_path, capsys):  # noqa: F811
    err = _error(_args(dataset, tmp_path / "out", "torch", "--epochs", "1", "--patch-size", "6"), capsys)
    assert "must be a multiple of patch_size 6" in err and "--img-size and --patch-size" in err


def test_output_that_is_a_file_or_not_writable_is_one_line(dataset, tmp_path, capsys):  # noqa: F811
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = _error(_args(dataset, afile, "torch", "--epochs", "1"), capsys)
    assert f"--output {afile} is a file, not a folder" in err
    err = _error(_args(dataset, afile / "sub", "torch", "--epochs", "1"), capsys)
    assert f"--output {afile / 'sub'} is not a folder this process can write" in err


def test_store_for_another_class_count_is_one_line(dataset, tmp_path, capsys):  # noqa: F811
    argv = _with_labels(_args(dataset, tmp_path / "o"), _store(tmp_path / "k5.tls", CLASSES, num_classes=5))
    err = _error(argv + ["--epochs", "1"], capsys)
    assert f"--data {dataset}: label store has K=5 classes but" in err


def test_initial_checkpoint_of_other_classes_gets_a_fresh_head(dataset, trained, tmp_path, capsys):  # noqa: F811
    """Same class count, other names: the classifier would score these classes as the old ones, so
    it is re-initialized (as for another class count); a damaged file is one line."""
    data = _copy(dataset, tmp_path / "data")
    for split in ("train", "val"):
        (data / split / "c0").rename(data / split / "c0_other")
    argv = _with_labels(_args(data, tmp_path / "ft"), _store(tmp_path / "other.tls", ["c0_other", "c1", "c2"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(argv + ["--epochs", "1", "--max-steps", "1", "--initial-checkpoint", str(trained / "last.pth")])
    out = capsys.readouterr().out
    assert "re-initialized head.weight, head.bias, aux_head.weight, aux_head.bias" in out, out
    same = [a for a in _args(dataset, tmp_path / "same")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(same + ["--epochs", "1", "--max-steps", "1", "--initial-checkpoint", str(trained / "last.pth")])
    assert "re-initialized" not in capsys.readouterr().out  # the same classes: every weight kept
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"nothing")
    err = _error(_args(dataset, tmp_path / "x", "torch", "--epochs", "1", "--initial-checkpoint", str(bad)), capsys)
    assert f"--initial-checkpoint: {bad} is damaged or not a checkpoint" in err


def test_a_bug_keeps_its_traceback(dataset, tmp_path):  # noqa: F811
    """Only input errors are turned into one line: an exception from the code itself propagates."""
    def make_loss(args, token_model):
        def loss(outputs, batch):
            raise ZeroDivisionError("a bug")
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ZeroDivisionError, match="a bug"):
            main(_args(dataset, tmp_path / "o", "torch", "--epochs", "1"), make_loss=make_loss)
