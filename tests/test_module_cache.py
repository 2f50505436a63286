"""Module cache: a hit loads without building, damaged entries are rebuilt, concurrent builders agree.

One real in-process build (module fixture) and two in the concurrency test. Tests that need a
rebuild replace ``build`` by one returning that first fresh build: they test the cache, not TVM.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from turbotvm import TurboAttention
from turbotvm.cli import main as cli_main
from turbotvm.codegen import default_cache_dir, load_or_build, module_cache
from turbotvm.codegen.module_cache import ModuleCacheWarning, cache_entries, entry_name
from turbotvm.kernel_set import KernelSetConfig

SMALL = KernelSetConfig(head_dims=(64,), dtypes=("float32",))


def entries(cache_dir):
    return sorted(p.name for p in Path(cache_dir).iterdir())


def outputs(kernels, seed=0):
    """Prefill (causal and full) and decode over a compressed cache, on fixed random inputs."""
    rng = np.random.default_rng(seed)
    q, k, v = (torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in
               [(1, 4, 100, 64), (1, 2, 100, 64), (1, 2, 100, 64)])
    turbo = TurboAttention(kernels)
    cache = turbo.compress_kv(k, v, (4, 2))
    return [turbo.prefill(q, k, v, causal=True), turbo.prefill(q, k, v), turbo.decode(q[:, :, -1:].contiguous(), cache)]


def assert_bit_identical(a, b):
    for x, y in zip(outputs(a), outputs(b)):
        assert torch.equal(x, y)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """An empty cache filled by one real build; keeps the fresh build for comparisons."""
    cache_dir = tmp_path_factory.mktemp("cache")
    fresh = []

    def spy(*args, **kwargs):
        fresh.append(real_build(*args, **kwargs))
        return fresh[-1]

    real_build = module_cache.build
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module_cache, "build", spy)
        cached = load_or_build("llvm", SMALL, cache_dir)
    assert len(fresh) == 1
    (name,) = entries(cache_dir)
    return SimpleNamespace(cache_dir=cache_dir, entry=cache_dir / name, fresh=fresh[0], cached=cached)


@pytest.fixture
def copy(first, tmp_path):
    """A private copy of the filled cache, free to damage."""
    cache_dir = tmp_path / "cache"
    shutil.copytree(first.cache_dir, cache_dir)
    return cache_dir / first.entry.name


@pytest.fixture
def counted_build(first, monkeypatch):
    """Replace build by one returning the first fresh build; counts calls."""
    calls = []
    monkeypatch.setattr(module_cache, "build", lambda *a, **k: calls.append(a) or first.fresh)
    return calls


def refuse_build(*args, **kwargs):
    raise AssertionError("build was called on a cache hit")


def test_second_call_loads_without_building(first, monkeypatch):
    monkeypatch.setattr(module_cache, "build", refuse_build)
    again = load_or_build("llvm", SMALL, first.cache_dir)
    assert again.config == SMALL and again.names == first.fresh.names
    assert entries(first.cache_dir) == [first.entry.name]
    assert json.loads((first.entry / "key.json").read_text())["config"] == SMALL.to_json()


def test_loaded_kernels_bit_identical_to_fresh_build(first, monkeypatch):
    monkeypatch.setattr(module_cache, "build", refuse_build)
    assert_bit_identical(first.fresh, load_or_build("llvm", SMALL, first.cache_dir))
    assert_bit_identical(first.fresh, first.cached)  # what the building call returned


def test_turbo_attention_cached(first, monkeypatch):
    monkeypatch.setattr(module_cache, "build", refuse_build)
    turbo = TurboAttention.cached("llvm", head_dims=(64,), dtypes=("float32",), cache_dir=first.cache_dir)
    assert_bit_identical(first.fresh, turbo.kernels)


DAMAGES = {
    "truncated library": (lambda e: (e / "kernels.so").write_bytes((e / "kernels.so").read_bytes()[:1000]),
                          "checksum differs"),
    "garbage manifest": (lambda e: (e / "manifest.json").write_text("\x00garbage{"), "not a turbotvm manifest"),
    "missing key": (lambda e: (e / "key.json").unlink(), "key.json"),
    "foreign key": (lambda e: (e / "key.json").write_text(json.dumps({"format": "x"})), "another key"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_entry_warns_and_is_rebuilt(first, copy, counted_build, damage):
    spoil, reason = DAMAGES[damage]
    spoil(copy)
    with pytest.warns(ModuleCacheWarning, match=reason) as record:
        rebuilt = load_or_build("llvm", SMALL, copy.parent)
    assert str(copy) in str(record[0].message)
    assert len(counted_build) == 1
    assert entries(copy.parent) == [copy.name]  # no temporary or trash left behind
    assert_bit_identical(first.fresh, rebuilt)
    load_or_build("llvm", SMALL, copy.parent)  # and the new entry is a hit
    assert len(counted_build) == 1


def test_losing_the_race_uses_the_winners_entry(first, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"

    def build_while_another_process_publishes(*args, **kwargs):
        shutil.copytree(first.entry, cache_dir / first.entry.name)
        (cache_dir / first.entry.name / "winner").touch()
        return first.fresh

    monkeypatch.setattr(module_cache, "build", build_while_another_process_publishes)
    kernels = load_or_build("llvm", SMALL, cache_dir)
    assert entries(cache_dir) == [first.entry.name]
    assert (cache_dir / first.entry.name / "winner").exists()
    assert_bit_identical(first.fresh, kernels)


def test_other_key_is_another_entry(first, copy, counted_build, monkeypatch):
    name = entry_name("llvm", SMALL)
    assert name == copy.name and name.startswith("llvm-")
    others = [entry_name("llvm", KernelSetConfig((64,), ("float16",))), entry_name("llvm", KernelSetConfig((128,))),
              entry_name({"kind": "llvm", "num-cores": 1}, SMALL)]
    with monkeypatch.context() as mp:
        mp.setattr(module_cache, "_versions", lambda: {"turbotvm": "0.1.0", "tvm": "0.27.0", "tvm_ffi": "9"})
        others.append(entry_name("llvm", SMALL))
    assert len({name, *others}) == 5

    with monkeypatch.context() as mp:  # an edited kernel source: a second entry next to the first
        mp.setattr(module_cache, "source_hash", lambda: "edited")
        load_or_build("llvm", SMALL, copy.parent)
    assert len(counted_build) == 1 and len(entries(copy.parent)) == 2
    load_or_build("llvm", SMALL, copy.parent)  # the first one is still a hit
    assert len(counted_build) == 1

    monkeypatch.setattr(module_cache, "build", refuse_build)  # another config never reuses an entry
    with pytest.raises(AssertionError, match="build was called"):
        load_or_build("llvm", KernelSetConfig((64,), ("float16",)), copy.parent)


CHILD = """
import json, sys, time, warnings
from pathlib import Path
import torch
from turbotvm.codegen import load_or_build, module_cache
warnings.simplefilter("error", module_cache.ModuleCacheWarning)
from turbotvm.kernel_set import KernelSetConfig
sys.path.insert(0, sys.argv[4])
from test_module_cache import outputs

cache_dir, ready, go = sys.argv[1:4]
builds, real_build = [], module_cache.build
module_cache.build = lambda *a, **k: builds.append(1) or real_build(*a, **k)
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
kernels = load_or_build("llvm", KernelSetConfig((64,), ("float32",)), cache_dir)
torch.save(outputs(kernels), sys.argv[5])
print(json.dumps({"builds": len(builds), "entry": module_cache.entry_name("llvm", kernels.config)}))
"""


def test_two_processes_build_concurrently(first, tmp_path):
    cache_dir = tmp_path / "cache"
    go = tmp_path / "go"
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(cache_dir), str(tmp_path / f"ready{i}"), str(go),
                                  str(Path(__file__).parent), str(tmp_path / f"out{i}.pt")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(2)]
    try:
        deadline = time.time() + 300
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert time.time() < deadline and all(c.poll() is None for c in children), "children did not start"
            time.sleep(0.05)
        go.touch()  # both look at the empty cache at once
        results = [c.communicate(timeout=600) for c in children]
    finally:
        for c in children:
            c.kill()
    reports = []
    for child, (stdout, stderr) in zip(children, results):
        assert child.returncode == 0, stderr[-3000:]
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [r["builds"] for r in reports] == [1, 1]  # both raced: neither found an entry
    assert entries(cache_dir) == [reports[0]["entry"]] == [reports[1]["entry"]]
    for x, y in zip(torch.load(tmp_path / "out0.pt"), torch.load(tmp_path / "out1.pt")):
        assert torch.equal(x, y)
    if reports[0]["entry"] == first.entry.name:  # else someone edited a kernel source meanwhile
        for x, y in zip(torch.load(tmp_path / "out0.pt"), outputs(first.fresh)):
            assert torch.equal(x, y)


def test_cuda_without_gpu_is_a_clear_error(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(module_cache, "build", refuse_build)
    with pytest.raises(RuntimeError, match="CUDA entry needs a GPU"):
        load_or_build({"kind": "cuda", "arch": "sm_90"}, SMALL, tmp_path)


def test_bad_config_argument(tmp_path):
    with pytest.raises(TypeError, match="config: expected a KernelSetConfig"):
        load_or_build("llvm", {"head_dims": (64,)}, tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TURBOTVM_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("TURBOTVM_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "turbotvm"


def test_cli_cache_info_and_clear(copy):
    (copy.parent / "unrelated.txt").write_text("not ours")
    assert [e["path"].name for e in cache_entries(copy.parent)] == [copy.name]
    assert cli_main(["cache", "info", "--cache-dir", str(copy.parent)]) == 0
    assert cli_main(["cache", "clear", "--cache-dir", str(copy.parent)]) == 0
    assert entries(copy.parent) == ["unrelated.txt"]
    os.remove(copy.parent / "unrelated.txt")
