"""Data readers and the on-device loader."""
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from handmade import CreatesFile, write_cifar10
from tdlrt_cli.config import DataConfig
from tdlrt_cli.data import DataError, DeviceLoader, ImageTensors, _cifar, build_data, random_crop_flip


def test_cifar_copy_with_other_checksums_is_read_with_a_warning(tmp_path):
    folder = write_cifar10(tmp_path)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=False, augment=True)
    with pytest.warns(UserWarning, match="differ from the originals"):
        data = build_data(cfg, 16, 64, torch.device("cpu"), seed=0)
    assert (data.in_channels, data.num_classes, data.image_size) == (3, 10, 32)
    assert len(data.train) == 100 // 16 and data.test.num_examples == 20
    with open(folder / "data_batch_1", "rb") as fh:
        first = pickle.load(fh)
    x = torch.tensor(first["data"][0]).view(3, 32, 32)
    assert torch.equal(data.train.images[0], x)  # R, G, B planes row-major


def test_unreadable_cifar_file_is_a_clear_error(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="cannot read .*test_batch"):
            build_data(DataConfig(name="cifar10", root=str(tmp_path), download=False), 16, 64, torch.device("cpu"), 0)


def test_limits_take_the_first_examples(tmp_path):
    write_cifar10(tmp_path)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=False, limit_train=30, limit_test=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = build_data(cfg, 8, 4, torch.device("cpu"), 0)
    assert len(data.train.labels) == 30 and len(data.test.labels) == 7
    assert sum(len(y) for _, y in data.test) == 7
    assert sum(len(y) for _, y in data.train) == 24  # full batches only


def test_crop_and_flip_move_pixels_without_inventing_values():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    g = torch.Generator().manual_seed(0)
    seen_shift = False
    for _ in range(20):
        y = random_crop_flip(x, 2, g)
        assert y.shape == x.shape
        vals = set(y[0].unique().tolist()) - {0}
        assert vals <= set(x[0].unique().tolist())
        seen_shift |= not torch.equal(y, x)
    assert seen_shift
    zero = random_crop_flip(x, 0, torch.Generator().manual_seed(1))
    assert all(torch.equal(z, x[i]) or torch.equal(z, x[i].flip(-1)) for i, z in enumerate(zero))


def test_epoch_order_depends_only_on_seed_and_epoch():
    data = ImageTensors(torch.randint(0, 255, (64, 3, 8, 8), dtype=torch.uint8), torch.arange(64))
    a = DeviceLoader(data, 16, torch.device("cpu"), (0.5,) * 3, (0.25,) * 3, train=True, augment=True, seed=3)
    b = DeviceLoader(data, 16, torch.device("cpu"), (0.5,) * 3, (0.25,) * 3, train=True, augment=True, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(3)
    assert not torch.equal(next(iter(a))[1], next(iter(b))[1])


def test_synthetic_data_is_reproducible_and_learnable_shape():
    cfg = DataConfig(name="synthetic", root="", download=False, image_size=16, channels=2, num_classes=4,
                     train_size=40, test_size=10)
    a = build_data(cfg, 8, 8, torch.device("cpu"), seed=1)
    b = build_data(cfg, 8, 8, torch.device("cpu"), seed=1)
    assert torch.equal(a.train.images, b.train.images)
    assert (a.in_channels, a.num_classes, a.image_size) == (2, 4, 16)


def test_imagefolder_reads_class_folders(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((40, 40, 3), 60 * i, dtype=np.uint8)).save(d / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), download=False, image_size=32, num_workers=0)
    data = build_data(cfg, 4, 4, torch.device("cpu"), 0)
    assert (data.num_classes, data.image_size) == (2, 32)
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    with pytest.raises(DataError, match="data.root"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path / "none"), download=False), 4, 4,
                   torch.device("cpu"), 0)


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_crafted_cifar_batch_runs_no_code_and_is_refused_naming_it(tmp_path, protocol):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "payload-ran"
    with open(folder / "data_batch_1", "wb") as fh:  # a dict like a batch, with a payload among its values
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "x": CreatesFile(marker)}, fh,
                    protocol=protocol)
    with pytest.raises(DataError) as info:
        build_data(DataConfig(name="cifar10", root=str(tmp_path), download=False), 16, 64, torch.device("cpu"), 0)
    assert not marker.exists(), "unpickling the batch ran its payload"
    message = str(info.value)
    assert str(folder / "data_batch_1") in message and "\n" not in message
    assert "builtins.open" in message or "io.open" in message


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_batches_written_by_this_python_and_numpy_are_read(tmp_path, protocol):
    from tdlrt_cli.data import read_cifar_batch

    batch = {"data": np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072), "labels": [3, 7],
             "batch_label": "training batch 1 of 5", "filenames": [b"a.png", "b.png"]}
    with open(tmp_path / "batch", "wb") as fh:
        pickle.dump(batch, fh, protocol=protocol)
    read = read_cifar_batch(tmp_path / "batch")
    assert np.array_equal(read["data"], batch["data"]) and read["labels"] == [3, 7]
    assert read["filenames"] == [b"a.png", "b.png"]


def test_the_real_cifar10_batches_load():
    from pathlib import Path

    from conftest import ROOT
    from tdlrt_cli.data import read_cifar_batch

    root = Path(os.environ.get("TDLRT_DATA", ROOT / "data"))
    if not (root / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.skip(f"no CIFAR-10 copy in {root}/cifar-10-batches-py (set TDLRT_DATA or put it in data/)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a copy with other checksums is read with a warning
        train, test, k = _cifar(root, "cifar10", download=False)
    assert k == 10 and train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and set(test.labels.tolist()) == set(range(10))
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as fh:  # the project's own copy: trusted
        plain = pickle.load(fh, encoding="latin1")
    restricted = read_cifar_batch(root / "cifar-10-batches-py" / "test_batch")
    assert restricted.keys() == plain.keys() and np.array_equal(restricted["data"], plain["data"])
    assert all(np.array_equal(restricted[key], plain[key]) for key in plain)


def test_imagefolder_takes_imagenets_transforms_at_imagenet_resolution():
    from torchvision import transforms

    from tdlrt_cli.config import DataConfig
    from tdlrt_cli.data import folder_transforms

    def kinds(size, train, crop="auto"):
        steps = folder_transforms(DataConfig(name="imagefolder", root="x", image_size=size, crop=crop), train)
        return [(type(s).__name__, getattr(s, "size", None)) for s in steps[:-2]]

    assert kinds(224, True) == [("RandomResizedCrop", (224, 224)), ("RandomHorizontalFlip", None)]
    assert kinds(224, False) == [("Resize", 256), ("CenterCrop", (224, 224))]  # 224 / 0.875
    assert kinds(64, True) == [("Resize", 64), ("CenterCrop", (64, 64)), ("RandomCrop", (64, 64)),
                               ("RandomHorizontalFlip", None)]  # Tiny ImageNet: as before
    assert kinds(64, False) == [("Resize", 64), ("CenterCrop", (64, 64))]
    assert kinds(224, False, crop="pad") == [("Resize", 224), ("CenterCrop", (224, 224))]
    normalize = folder_transforms(DataConfig(name="imagefolder", root="x", image_size=224), False)[-1]
    assert isinstance(normalize, transforms.Normalize) and normalize.mean == (0.485, 0.456, 0.406)
