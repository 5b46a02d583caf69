import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Under pytest-xdist every worker gets one core: one thread per process avoids oversubscribing them.
PARALLEL = "PYTEST_XDIST_WORKER" in os.environ
if PARALLEL:
    import torch

    torch.set_num_threads(1)

# A tiny, fast configuration for CLI runs: VGG16 at 1/8 width on synthetic 32x32 images.
TINY = ["model=vgg16", "model.width_mult=0.125", "data=synthetic", "data.train_size=256", "data.test_size=128",
        "batch_size=64", "eval_batch_size=128", "epochs=2", "progress=false", "device=cpu", "cost_repeat=2"]


def default_signals():
    """In the child: SIGHUP and SIGINT as a terminal's command has them, also when the tests run under nohup or
    in a shell's background job (which ignore them, and tdlrt keeps a signal it was started to ignore ignored)."""
    import signal

    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_tdlrt(args, cwd, env=None, check=True, timeout=600):
    """Run the real console entry point in a subprocess; returns CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if PARALLEL else {}), **(env or {})}
    full_env.pop("TDLRT_DEBUG", None)
    exe = Path(sys.executable).parent / "tdlrt"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tdlrt_cli"]
    proc = subprocess.run([*cmd, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=default_signals)
    if check and proc.returncode != 0:
        raise AssertionError(f"tdlrt {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_dirs(base: Path):
    """Run folders (those holding a .hydra folder) under base, oldest first."""
    return sorted((p.parent for p in base.rglob(".hydra")), key=lambda p: str(p))


@pytest.fixture(scope="session")
def real_data():
    """A real MNIST copy in torchvision's layout (``MNIST/raw``) under ``$TDLRT_DATA`` or the project's
    ``data/`` folder, as `tdlrt train data=mnist` reads it; skipped where there is none (tests never download)."""
    root = Path(os.environ.get("TDLRT_DATA", ROOT / "data"))
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file() and \
            not (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no MNIST copy in {root}/MNIST/raw (set TDLRT_DATA or put it in data/)")
    return root
