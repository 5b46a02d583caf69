"""Bad data through `tdlrt train`, through the real CLI: an imagefolder tree with a file that is no image or an
image cut short, a data.mean, data.std or data.num_workers it cannot take, and a crafted CIFAR-10 batch; each
ends with exit status 2 and one `tdlrt: error:` line naming the file or key, and writes no checkpoint."""
import pickle

import pytest
import torch

from conftest import one_error_line, run_tdlrt
from handmade import CreatesFile, write_cifar10


# --------------------------------------------------------------------------- data=imagefolder

def image_tree(root, classes=("a", "b"), n=3):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (12, 12, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def not_an_image(root):
    (root / "train" / "b" / "notes.png").write_text("this is not a picture")


def cut_short(root):
    data = (root / "train" / "a" / "0.png").read_bytes()
    (root / "train" / "b" / "cut.png").write_bytes(data[:60])  # a valid header, the pixels cut off


IMAGEFOLDER_CASES = [  # (id, change to the tree, overrides, needles)
    ("non-image-file", not_an_image, [], ["notes.png", "is not a readable image", "remove it"]),
    ("std-zero", None, ["data.std=[0.2,0,0.2]"], ["data.std=[0.2, 0.0, 0.2]", "must be > 0"]),
    ("mean-wrong-length", None, ["data.mean=[0.5,0.5]"], ["data.mean=[0.5, 0.5]", "give 3"]),
    ("num-workers-negative", None, ["data.num_workers=-1"], ["data.num_workers=-1", "must be >= 0"]),
]


def imagefolder_args(root):
    return ["train", "model=lenet5", "data=imagefolder", f"data.root={root}", "data.image_size=32",
            "data.num_workers=0", "batch_size=2", "eval_batch_size=4", "epochs=1", "progress=false", "device=cpu",
            "cost_report=false", "method=dense"]


@pytest.mark.parametrize("name, change, overrides, needles", IMAGEFOLDER_CASES, ids=[c[0] for c in IMAGEFOLDER_CASES])
def test_imagefolder_bad_input(tmp_path, name, change, overrides, needles):
    root = image_tree(tmp_path / "images")
    if change is not None:
        change(root)
    one_error_line(imagefolder_args(root) + overrides, tmp_path, *needles)
    assert not list(tmp_path.rglob("*.pt"))  # failed before training


def test_an_image_cut_short_ends_the_run_with_one_error_line(tmp_path):
    """Its header reads, so only decoding it (in a loader worker, during the epoch) finds the damage: the run
    ends with one error line naming the file, not with the worker's traceback."""
    root = image_tree(tmp_path / "images")
    cut_short(root)
    proc = run_tdlrt(imagefolder_args(root) + ["data.num_workers=1"], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tdlrt: error: cannot read image ") and "cut.png" in last and "replace it" in last


# --------------------------------------------------------------------------- data=cifar10

def test_a_crafted_cifar_batch_stops_tdlrt_train_with_one_line(tmp_path):
    folder = write_cifar10(tmp_path / "data")
    marker = tmp_path / "payload-ran"
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump(CreatesFile(marker), fh, protocol=2)
    proc = run_tdlrt(["train", "data=cifar10", f"data.root={tmp_path / 'data'}", "model=vgg16",
                      "model.width_mult=0.125", "epochs=1", "device=cpu", "progress=false"], tmp_path, check=False)
    assert not marker.exists(), "unpickling the batch ran its payload"
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdlrt: error: refusing to read") and "data_batch_1" in lines[0]
