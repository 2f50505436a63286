import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "turbotvm.cli", *args], capture_output=True, text=True, timeout=900)


def test_info():
    result = run("info")
    assert result.returncode == 0, result.stderr
    assert "0.27.0" in result.stdout and "tvm-ffi" in result.stdout


def test_build_cpu_then_load(tmp_path):
    result = run("build", "--target", "llvm", "--out", str(tmp_path / "m"), "--head-dims", "64")
    assert result.returncode == 0, result.stderr
    from turbotvm.codegen import load

    assert "prefill_causal_d64_float32" in load(tmp_path / "m").names


def test_bad_target_is_a_clear_error(tmp_path):
    result = run("build", "--target", "rocm", "--out", str(tmp_path / "m"))
    assert result.returncode == 2
    assert "target: expected kind 'llvm' or 'cuda'" in result.stdout


def test_example_runs():
    import pathlib

    example = pathlib.Path(__file__).parent.parent / "examples" / "prefill_decode_cpu.py"
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "decode cos vs exact" in result.stdout
