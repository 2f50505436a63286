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


def test_bench_times_variants_in_alternating_rounds():
    """A clock that drifts during the run: timed one after the other, the later variant would carry
    the drift; in alternating rounds each variant's median sits in the middle of the run."""
    from turbotvm.bench import interleaved_ms

    order, clock = [], iter(range(1000))

    def measure(name, base):
        def run():
            order.append(name)
            return base + next(clock)  # each measurement 1 ms slower than the one before
        return run

    times = interleaved_ms({"sdpa": measure("sdpa", 100.0), "ours": measure("ours", 100.0)}, rounds=5)
    assert order == ["sdpa", "ours"] * 5
    assert times == {"sdpa": 104.0, "ours": 105.0}  # medians of 100, 102, ..., 108 and 101, 103, ..., 109


def test_demo_benchmark_arguments_come_from_the_benchmark_parser(tmp_path):
    """On a GPU the demo runs the benchmark with the repository's tuning log for the GPU's arch. Its options
    come from the benchmark's own parser: a hand-made Namespace once lacked ``tuning_log`` and failed on
    every GPU, where CI cannot see it."""
    from turbotvm.demo import bench_args, shipped_tuning_log

    log = shipped_tuning_log("sm_90")
    assert log is not None and log.name == "sm_90" and (log / "database_workload.json.xz").is_file()
    assert shipped_tuning_log("sm_0") is None
    args = bench_args(tmp_path, True, log)
    assert (args.quick, args.out, args.tuning_log, args.skip_decode) == (True, str(tmp_path / "bench"), str(log), False)
    assert bench_args(tmp_path, False, None).tuning_log is None
