"""Datasets and loaders.

Datasets that fit in memory (CIFAR, MNIST, synthetic) are read once into uint8 tensors, moved to the
training device and augmented there (random crop with padding, horizontal flip), so a GPU epoch never
waits for CPU workers. ImageNet-style folders go through a standard torchvision DataLoader.
"""
from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataConfig
from .errors import DataError

STATS = {  # per-channel mean and std of the training images, in [0, 1]
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}


CLASSES = {  # class names in label order (torchvision's)
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "mnist": [str(d) for d in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
}


def normalisation(name: str, cfg: Optional[DataConfig] = None) -> Optional[Tuple[tuple, tuple]]:
    """(mean, std) of a dataset whose normalisation its name (or, for imagefolder, its config) fixes; None
    where it is measured on the training images (synthetic)."""
    if name in STATS:
        return STATS[name]
    if name == "imagefolder" and cfg is not None:
        return _folder_stats(cfg)
    return None


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that :class:`CifarUnpickler` does not admit."""

_CHECKED: dict = {}  # data folder -> the files whose checksum differs (checked once per process)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2 (``encode(text, "latin1")``), latin-1 only."""
    if encoding not in ("latin1", "latin-1"):
        raise RefusedGlobal(f"it would call _codecs.encode with encoding {encoding!r}, not latin1")
    return text.encode("latin1")


# The globals a pickled CIFAR batch needs (a dict of bytes, lists and uint8 numpy arrays), as written by
# Python 2 (the original files) and by numpy 1.x and 2.x pickles at protocols 2 to 5.
CIFAR_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"),
                 ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds: dicts, lists, numbers, strings, bytes and numpy arrays.

    Any other global (a function or class a crafted file would call when unpickled) raises
    :class:`RefusedGlobal` before it is even imported, so reading a file runs no code of its author."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise RefusedGlobal(f"it would call {module}.{name}, which a CIFAR batch never holds")


def read_cifar_batch(path: Path) -> dict:
    """One CIFAR batch file, read with :class:`CifarUnpickler` (whatever its checksum); a file that is not a
    pickled dict of plain data raises ``DataError`` naming it."""
    try:
        with open(path, "rb") as fh:
            batch = CifarUnpickler(fh, encoding="latin1").load()
    except RefusedGlobal as exc:
        raise DataError(f"refusing to read {path}: not a CIFAR batch ({exc}); replace it with the original "
                        f"file") from None
    except Exception as exc:
        raise DataError(f"cannot read {path} ({_why(exc)})") from None
    if not isinstance(batch, dict):
        raise DataError(f"cannot read {path}: it holds a {type(batch).__name__}, not a CIFAR batch (a dict)")
    return batch


def _why(exc: BaseException) -> str:
    """An exception as one short line (download errors span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


@dataclass
class ImageTensors:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N


@dataclass
class DataBundle:
    train: "DeviceLoader | FolderLoader"
    test: "DeviceLoader | FolderLoader"
    in_channels: int
    num_classes: int
    image_size: int
    val: "Optional[DeviceLoader]" = None  # data.val_split > 0: the held-out end of the training set
    mean: Tuple[float, ...] = ()    # per-channel normalisation of the pixels scaled to [0, 1]: (x - mean) / std
    std: Tuple[float, ...] = ()
    classes: Optional[List[str]] = None  # the class names, in label order, where the data names them

    @property
    def train_examples(self) -> int:
        """Training examples (an epoch sees ``train.num_examples``: whole batches only)."""
        return self.train.dataset_size


# --------------------------------------------------------------------------- readers

def _cifar(root: Path, name: str, download: bool) -> Tuple[ImageTensors, ImageTensors, int]:
    """Read the original python-pickle CIFAR batches (:func:`read_cifar_batch`: no code in them runs); copies
    with other checksums are read with a warning."""
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import check_integrity

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    folder = root / cls.base_folder
    files = cls.train_list + cls.test_list
    if not all((folder / f).is_file() for f, _ in files):
        if not download:
            raise DataError(f"{name} not found in {folder}; put the dataset there (data.root=DIR) "
                            f"or allow downloading with data.download=true")
        try:
            cls(str(root), train=True, download=True)
        except Exception as exc:  # no network, disk full, ...
            raise DataError(f"could not download {name} into {root} ({_why(exc)}); "
                            f"put the dataset there by hand (data.root=DIR, data.download=false)") from None
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def read(entries):
        xs, ys = [], []
        for f, _ in entries:
            d = read_cifar_batch(folder / f)
            try:
                xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d[label_key], dtype=np.int64))
            except Exception as exc:
                raise DataError(f"cannot read {folder / f} ({_why(exc)})") from None
        return ImageTensors(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))

    train, test = read(cls.train_list), read(cls.test_list)
    key = str(Path(folder).resolve())
    if key not in _CHECKED:  # once per data folder and process (a sweep's jobs share it)
        _CHECKED[key] = [f for f, md5 in files if not check_integrity(str(folder / f), md5)]
        if _CHECKED[key]:
            warnings.warn(f"{name} files in {folder} differ from the originals (checksum of "
                          f"{', '.join(_CHECKED[key])}); read them anyway", stacklevel=2)
    return train, test, 10 if name == "cifar10" else 100


def _mnist(root: Path, name: str, download: bool) -> Tuple[ImageTensors, ImageTensors, int]:
    from torchvision.datasets import MNIST, FashionMNIST

    cls = MNIST if name == "mnist" else FashionMNIST
    out = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as exc:
            if not download:
                raise DataError(f"{name} not found in {root / cls.__name__ / 'raw'}; put the dataset there "
                                f"(data.root=DIR) or allow downloading with data.download=true") from None
            raise DataError(f"could not download {name} into {root} ({_why(exc)}); put the dataset there by hand "
                            f"(data.root=DIR, data.download=false)") from None
        except Exception as exc:
            raise DataError(f"cannot read {name} in {root} ({_why(exc)})") from None
        out.append(ImageTensors(ds.data.unsqueeze(1).contiguous(), ds.targets.long()))
    return out[0], out[1], 10


def seed64(key: int) -> int:
    """A generator seed from any non-negative integer (torch takes 64 bits): the key itself where it fits, so
    the batches of runs made before are unchanged; else its value modulo 2^64 (seeds up to 2^63 are valid)."""
    return key % (1 << 64)


def _synthetic(cfg: DataConfig, seed: int) -> Tuple[ImageTensors, ImageTensors, int]:
    """Images whose class sets a smooth colour pattern, plus noise: learnable, reproducible, no files."""
    g = torch.Generator().manual_seed(seed64(1234 + seed))
    size, c, k = cfg.image_size or 32, cfg.channels, cfg.num_classes
    protos = F.interpolate(torch.rand(k, c, 4, 4, generator=g), size=(size, size), mode="bilinear",
                           align_corners=False)

    def make(n):
        labels = torch.randint(0, k, (n,), generator=g)
        x = 0.6 * protos[labels] + 0.4 * torch.rand(n, c, size, size, generator=g)
        return ImageTensors((x * 255).round().clamp(0, 255).to(torch.uint8), labels)

    return make(cfg.train_size), make(cfg.test_size), k


# --------------------------------------------------------------------------- loaders

def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop (zero padding ``pad``) and horizontal flip of a batch, on x's device."""
    n, c, h, w = x.shape
    dev = x.device
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    flip = torch.rand(n, generator=generator).to(dev) < 0.5
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    xp = xp.gather(2, rows)
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + ox[:, None]
    return xp.gather(3, cols[:, None, None, :].expand(n, c, h, w))


class DeviceLoader:
    """Batches of an in-memory uint8 dataset kept on ``device``, normalised (and augmented) there.

    The order of epoch ``e`` depends only on ``(seed, e)`` and the crops of batch ``b`` only on
    ``(seed, e, b)``, so a run resumed mid-epoch (``set_epoch(e, start_batch=b)``) sees the same batches.
    Training batches drop the last incomplete batch (BatchNorm cannot take a batch of one).
    With ``shard(rank, world)`` (data parallel), global batch ``b`` of ``world * batch_size`` examples is
    split in ``world`` parts and this process takes part ``rank``; test batches are dealt round robin.
    """

    def __init__(self, data: ImageTensors, batch_size: int, device: torch.device, mean: Sequence[float],
                 std: Sequence[float], train: bool, augment: bool = False, seed: int = 0, pad: int = 4):
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size = min(batch_size, len(self.labels)) if train else batch_size
        self.device, self.train, self.augment, self.seed, self.pad = device, train, augment, seed, pad
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.epoch, self.start_batch, self.rank, self.world = 0, 0, 0, 1

    def shard(self, rank: int, world: int) -> None:
        if self.train and len(self.labels) < world * self.batch_size:
            raise DataError(f"{len(self.labels)} training examples cannot fill one batch of {self.batch_size} "
                            f"on each of {world} processes; lower batch_size")
        self.rank, self.world = rank, world

    def _global_batches(self) -> int:
        n = len(self.labels)
        return n // (self.batch_size * self.world) if self.train else -(-n // self.batch_size)

    def __len__(self) -> int:
        total = self._global_batches()
        return total if self.train else len(range(self.rank, total, self.world))

    @property
    def num_examples(self) -> int:
        """Examples an epoch sees (training: the whole batches; the partial one is dropped)."""
        return len(self) * self.batch_size if self.train else len(self.labels)

    @property
    def dataset_size(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if not self.train:
            for b in range(self.rank, self._global_batches(), self.world):
                sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
                yield (self.images[sl].float() - self.mean) / self.std, self.labels[sl]
            return
        key = self.seed * 100_003 + self.epoch
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(seed64(key))).to(self.device)
        for b in range(self.start_batch, len(self)):
            first = (b * self.world + self.rank) * self.batch_size
            idx = order[first:first + self.batch_size]
            x, y = self.images[idx], self.labels[idx]
            if self.augment:
                g = torch.Generator().manual_seed(seed64((key * 1_000_003 + b) * 64 + self.rank))
                x = random_crop_flip(x, self.pad, g)
            yield (x.float() - self.mean) / self.std, y


def _read_image(path: str):
    """An image file as RGB; an unreadable one ends the run with a DataError naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except Exception as exc:
        raise DataError(f"cannot read image {path} ({_why(exc)}); delete or replace it") from None


def _check_images(paths) -> None:
    """Open the header of every image before training, so that a stray non-image file fails at once."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as im:
                im.size
        except Exception as exc:
            raise DataError(f"{path} is not a readable image ({type(exc).__name__}); remove it from the class "
                            f"folder or replace it") from None


def _folder_stats(cfg: DataConfig):
    """data.mean / data.std of data=imagefolder (RGB: 3 values each, std > 0), ImageNet's by default."""
    mean = (0.485, 0.456, 0.406) if cfg.mean is None else tuple(cfg.mean)
    std = (0.229, 0.224, 0.225) if cfg.std is None else tuple(cfg.std)
    for key, values in (("data.mean", mean), ("data.std", std)):
        if len(values) != 3:
            raise DataError(f"{key}={list(values)} has {len(values)} values; data=imagefolder reads RGB images, "
                            f"give 3 (one per channel)")
    if not all(v > 0 for v in std):
        raise DataError(f"data.std={list(std)} must be > 0 in every channel (it divides the pixels)")
    return mean, std


IMAGENET_SIZE = 160  # data.crop=auto: ImageNet's transforms from this image size up, the padded crop below
EVAL_CROP = 0.875    # ImageNet evaluation: resize to size / 0.875 (256 for 224), then the centre crop


def folder_transforms(cfg: DataConfig, train: bool) -> list:
    """The transforms of data=imagefolder. ``data.crop=imagenet`` (auto from 160 pixels up): training images a
    random resized crop and a flip, test images resized to size / 0.875 and centre-cropped (torchvision's
    ImageNet recipe); ``pad`` (auto below): resized and centre-cropped, training images then a random crop with
    size / 8 padding and a flip (the CIFAR recipe, Tiny ImageNet's 64 pixels)."""
    from torchvision import transforms

    size = cfg.image_size or 64
    mean, std = _folder_stats(cfg)
    crop = cfg.crop if cfg.crop != "auto" else ("imagenet" if size >= IMAGENET_SIZE else "pad")
    if crop == "imagenet":
        steps = ([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] if train and cfg.augment
                 else [transforms.Resize(round(size / EVAL_CROP)), transforms.CenterCrop(size)])
    else:
        steps = [transforms.Resize(size), transforms.CenterCrop(size)]
        if train and cfg.augment:
            steps += [transforms.RandomCrop(size, padding=size // 8), transforms.RandomHorizontalFlip()]
    return steps + [transforms.ToTensor(), transforms.Normalize(mean, std)]


class FolderLoader:
    """ImageNet-style class folders through torchvision transforms and a DataLoader."""

    def __init__(self, folder: Path, cfg: DataConfig, batch_size: int, train: bool, seed: int, limit: Optional[int]):
        from torchvision import datasets, transforms

        if cfg.num_workers < 0:
            raise DataError(f"data.num_workers={cfg.num_workers} must be >= 0 (0: load in the main process)")
        size = cfg.image_size or 64
        steps = folder_transforms(cfg, train)
        try:
            ds = datasets.ImageFolder(str(folder), transform=transforms.Compose(steps), loader=_read_image)
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"no image class folders in {folder} ({_why(exc)}); set data.root=DIR to a folder "
                            f"holding {cfg.train_dir}/ and {cfg.test_dir}/") from None
        self.classes = ds.classes
        self.num_classes = len(ds.classes)
        _check_images(path for path, _ in ds.samples[:limit])
        if limit is not None:
            ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
        self.dataset, self.train, self.seed, self.epoch, self.start_batch = ds, train, seed, 0, 0
        self.rank, self.world = 0, 1
        self.batch_size = batch_size
        self.num_workers = cfg.num_workers
        self.in_channels, self.image_size = 3, size

    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.train:
            return max(1, n // (self.batch_size * self.world))
        return len(range(self.rank, -(-n // self.batch_size), self.world))

    @property
    def num_examples(self) -> int:
        return len(self.dataset)

    @property
    def dataset_size(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        """This process's batches from ``start_batch`` on; the order depends only on (seed, epoch)."""
        n, bs = len(self.dataset), self.batch_size
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed64(self.seed * 100_003 + self.epoch)))
            batches = [order[(b * self.world + self.rank) * bs:][:bs].tolist() for b in range(self.start_batch, len(self))]
        else:
            batches = [list(range(b * bs, min(n, (b + 1) * bs))) for b in range(self.rank, -(-n // bs), self.world)]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                                             pin_memory=torch.cuda.is_available(), persistent_workers=False)
        try:
            yield from loader
        except DataError as exc:  # raised in a worker process: torch puts its traceback into the message
            raise DataError(str(exc).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None


def _limit(d: ImageTensors, n: Optional[int]) -> ImageTensors:
    return d if n is None else ImageTensors(d.images[:n], d.labels[:n])


def build_data(cfg: DataConfig, batch_size: int, eval_batch_size: int, device: torch.device, seed: int) -> DataBundle:
    """Read ``cfg.name`` from ``cfg.root`` (downloading when allowed) and build train and test loaders."""
    root = Path(os.path.expanduser(cfg.root))
    if cfg.name == "imagefolder":
        tr = FolderLoader(root / cfg.train_dir, cfg, batch_size, True, seed, cfg.limit_train)
        te = FolderLoader(root / cfg.test_dir, cfg, eval_batch_size, False, seed, cfg.limit_test)
        if te.classes != tr.classes:
            extra = sorted(set(te.classes) ^ set(tr.classes))[:3]
            raise DataError(f"the class folders of {root / cfg.test_dir} and {root / cfg.train_dir} differ "
                            f"({', '.join(extra) or 'order'}); both need the same class folders")
        mean, std = _folder_stats(cfg)
        return DataBundle(tr, te, 3, tr.num_classes, tr.image_size, mean=tuple(mean), std=tuple(std),
                          classes=list(tr.classes))
    if cfg.name in ("cifar10", "cifar100"):
        train, test, k = _cifar(root, cfg.name, cfg.download)
    elif cfg.name in ("mnist", "fashion_mnist"):
        train, test, k = _mnist(root, cfg.name, cfg.download)
    elif cfg.name == "synthetic":
        train, test, k = _synthetic(cfg, seed)
    else:
        raise DataError(f"unknown dataset {cfg.name!r}")
    train, test = _limit(train, cfg.limit_train), _limit(test, cfg.limit_test)
    val = None
    if cfg.val_split:
        n = len(train.labels)
        held = int(cfg.val_split) if cfg.val_split >= 1 else round(cfg.val_split * n)
        if held < 1 or held >= n:
            raise DataError(f"data.val_split={cfg.val_split} holds out {held} of the {n} training examples; "
                            f"it must leave at least one on each side (data.val_split=0 turns it off)")
        val = ImageTensors(train.images[n - held:], train.labels[n - held:])
        train = ImageTensors(train.images[:n - held], train.labels[:n - held])
    if cfg.name in STATS:
        mean, std = STATS[cfg.name]
    else:  # measured on the training images
        x = train.images.float() / 255
        mean = x.mean(dim=(0, 2, 3)).tolist()
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    c, size = train.images.shape[1], train.images.shape[-1]
    tr = DeviceLoader(train, batch_size, device, mean, std, train=True, augment=cfg.augment, seed=seed)
    te = DeviceLoader(test, eval_batch_size, device, mean, std, train=False)
    va = None if val is None else DeviceLoader(val, eval_batch_size, device, mean, std, train=False)
    return DataBundle(tr, te, c, k, size, va, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                      classes=CLASSES.get(cfg.name))
