"""folder:PATH with ImageNet's train/ and val/ layout, unreadable files and class counts."""
import numpy as np
import pytest
from PIL import Image

from zoo.data import DataError, build_datasets, class_count_lines, skipped_line
from zoo.train import main

MINI = (3, 16, 16)


def _write(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)


def _layout(root, train=None, val=None):
    """``train``/``val``: class -> image count."""
    for split, counts in (("train", train or {"cat": 3, "dog": 2}), ("val", val or {"cat": 1, "dog": 2})):
        for name, n in counts.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _write(root / split / name / f"{i}.png", seed=i)


def test_train_and_val_folders_are_used_as_given(tmp_path):
    _layout(tmp_path)
    bundle = build_datasets(f"folder:{tmp_path}", MINI, val_fraction=0.5)
    assert bundle.classes == ["cat", "dog"]
    assert all("/train/" in p for p, _ in bundle.train.samples) and len(bundle.train) == 5
    assert all("/val/" in p for p, _ in bundle.val.samples) and len(bundle.val) == 3
    assert sorted(bundle.val.targets) == [0, 1, 1]
    assert class_count_lines(bundle) == ["images per class (train/val): cat 3/1, dog 2/2"]


def test_classes_that_differ_between_train_and_val_are_named(tmp_path):
    _layout(tmp_path, val={"cat": 1, "dog": 1, "owl": 1})
    with pytest.raises(DataError, match=r"train/ and val/ must hold the same class subfolders; only in val/: owl$"):
        build_datasets(f"folder:{tmp_path}", MINI)


def test_a_class_with_no_val_image_is_reported(tmp_path):
    _layout(tmp_path, val={"cat": 2, "dog": 0})
    bundle = build_datasets(f"folder:{tmp_path}", MINI)
    lines = class_count_lines(bundle)
    assert lines[0] == "images per class (train/val): cat 3/2, dog 2/0"
    assert lines[1].startswith("warning: 1 class(es) with no val image") and lines[1].endswith(": dog")


def test_a_single_folder_still_splits_by_val_fraction(tmp_path):
    for name in ("cat", "dog"):
        for i in range(4):
            _write(tmp_path / name / f"{i}.png", seed=i)
    bundle = build_datasets(f"folder:{tmp_path}", MINI, val_fraction=0.5)
    assert len(bundle.train) == len(bundle.val) == 4


def test_skipped_line_names_few_and_counts_many():
    assert skipped_line(["a.png (bad)"]) == "skipped 1 unreadable image: a.png (bad)"
    many = [f"{i}.png (bad)" for i in range(7)]
    assert skipped_line(many) == "skipped 7 unreadable images; the first 3: 0.png (bad); 1.png (bad); 2.png (bad)"


def test_training_prints_one_line_per_unreadable_summary_and_the_counts(tmp_path, capsys):
    _layout(tmp_path / "data")
    (tmp_path / "data" / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "run"
    assert main(["--data", f"folder:{tmp_path / 'data'}", "--input-size", "16", "16", "--batch-size", "2",
                 "--epochs", "1", "--hflip", "0", "--out", str(out), "--no-progress"]) == 0
    printed, err = capsys.readouterr()
    assert "Warning" not in err and "warnings.warn" not in err
    lines = printed.splitlines()
    assert any(line.startswith("skipped 1 unreadable image: ") and "broken.png (" in line for line in lines)
    assert "images per class (train/val): cat 3/1, dog 2/2" in lines
    assert "augmentation: random resized crop scale 0.08-1 ratio 0.75-1.33" in lines
