"""The examples and the perplexity benchmark, run with small settings (tiny random-init models, short
sequences) on the session's CPU kernels, checked against exact attention."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_example_tiny(cpu_ops_runtime, capsys):
    pytest.importorskip("transformers")
    result = load_script("examples/generate.py").main(["--model", "tiny", "--max-new-tokens", "5", "--compare-exact"])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "x fp16" in out
    assert len(result["tokens"]) == 5 and result["tokens_per_s"] > 0
    assert result["same_prefix"] >= 3  # greedy tokens of exact attention (4-bit cache)


def test_benchmark_example_small(cpu_ops_runtime):
    rows = load_script("examples/benchmark.py").main(["--lengths", "130", "--repeats", "1", "--head-dim", "64"])
    assert len(rows) == 1 and rows[0]["prefill_turbo_ms"] > 0 and rows[0]["decode_turbo_ms"] > 0
    assert rows[0]["prefill_cos"] >= 0.999  # vs torch SDPA on the same inputs
    assert rows[0]["decode_cos"] >= 0.97  # one 4-bit decode step, random K/V (docs/algorithm.md: ~0.99)


def test_tune_export_load_example_in_a_fresh_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's turbotvm in the child processes
    run = subprocess.run([sys.executable, str(ROOT / "examples/tune_export_load.py"), "--out", str(tmp_path / "module")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "exported" in run.stdout and "cos vs SDPA" in run.stdout
    assert json.loads((tmp_path / "module" / "manifest.json").read_text())["config"]


def test_perplexity_benchmark_tiny(cpu_ops_runtime, tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "ppl.json"
    report = load_script("benchmarks/perplexity.py").main(
        ["--model", "tiny", "--windows", "1", "--window", "150", "--prefix", "80", "--chunk", "32", "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == {"exact", "int8", "kv4", "mixed"}
    rows = report["results"]
    assert rows["exact"]["decode_vs_exact"] == 0
    # random weights: INT8 prefill stays within 1 % of exact, the compressed cache within 20 %
    assert abs(rows["int8"]["prefill_vs_exact"]) < 0.01 and abs(rows["kv4"]["decode_vs_exact"]) < 0.2
