"""`tdlrt bench` argument errors through the real CLI: one line naming the key and the values it takes, and its
own keys suggested."""
import pytest

from conftest import run_tdlrt


@pytest.mark.parametrize("override, expected", [
    ("image_size=8", ["image_size=8", "model=vgg16", ">= 32"]),
    ("tau=2", ["tau=2", "(0, 1)"]),
    ("precision=fp16", ["precision=fp16", "fp32, bf16"]),
    ("graph=maybe", ["graph=maybe", "auto, true, false"]),
    ("batch_size=0", ["batch_size=0", ">= 1"]),
    ("steps=0", ["steps=0", ">= 1"]),
    ("spectra=approx", ["spectra=approx", "exact, fast"]),
    ("steps=many", ["steps", "could not be converted"]),
])
def test_bad_values_fail_with_one_line_naming_key_and_values(tmp_path, override, expected):
    proc = run_tdlrt(["bench", "model=vgg16", "device=cpu", "steps=1", "warmup=0", override], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdlrt: error: "), proc.stderr
    for text in expected:
        assert text.lower() in lines[0].lower(), (text, lines[0])
    assert "Traceback" not in proc.stderr and not proc.stdout


def test_bench_suggests_its_own_keys(tmp_path):
    proc = run_tdlrt(["bench", "width_mult=1", "rank_frac=0.2"], tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "did you mean model.width_mult=1?" in lines[0] and "`tdlrt bench --help` lists the keys" in lines[0]
    assert "method." not in lines[0] and "tdlrt train" not in lines[0]
