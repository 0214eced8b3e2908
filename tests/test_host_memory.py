"""mixq.host_memory: with it on, a large CPU tensor freed and allocated again reuses its pages
(no page faults); with it off (glibc's defaults) every allocation is mapped and faulted anew."""

import json
import subprocess
import sys

import pytest

from mixq import host_memory

# Run in a child process: the setting is process-wide, and a fresh process starts from glibc's
# defaults. 64 MiB is above glibc's largest mmap threshold (32 MiB), so by default every such
# tensor is a fresh mapping: 16,384 faults of 4 KiB pages when it is filled.
CHILD = r"""
import json, resource, sys
import torch
from mixq import host_memory

def faults_to_fill():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 1024 * 1024)  # 64 MiB of float32
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

out = {"default": [faults_to_fill() for _ in range(3)]}
out["keep_ok"] = host_memory.keep_freed_host_memory()
out["kept"] = host_memory.freed_host_memory_kept()
out["keep"] = [faults_to_fill() for _ in range(6)]
out["restore_ok"] = host_memory.keep_freed_host_memory(False)
out["kept_after"] = host_memory.freed_host_memory_kept()
out["restored"] = [faults_to_fill() for _ in range(3)]
print(json.dumps(out))
"""

PAGES = 16 * 1024 * 1024 * 4 // 4096


@pytest.mark.skipif(host_memory._glibc() is None, reason="mallopt parameters are glibc's")
def test_kept_memory_is_reused_without_page_faults():
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    # glibc's defaults: every 64 MiB tensor is mapped anew and each of its pages faults
    assert all(f >= 0.9 * PAGES for f in out["default"]), out
    assert out["keep_ok"] and out["kept"]
    # kept: the first allocations grow the heap (faults; a small block taken from the freed one in
    # between can make the second grow it again), then they reuse its pages
    assert all(f < 0.05 * PAGES for f in out["keep"][3:]), out
    # restored: malloc_trim handed the pages back, so the next tensor faults them in again (a hole
    # the heap keeps in its middle may serve the ones after it)
    assert out["restore_ok"] and not out["kept_after"]
    assert out["restored"][0] >= 0.9 * PAGES, out


@pytest.mark.parametrize("value, expected", [(None, True), ("1", True), ("on", True), ("0", False),
                                             ("false", False), (" OFF ", False)])
def test_environment_variable_turns_it_off(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(host_memory.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(host_memory.ENV_VAR, value)
    assert host_memory.wanted() is expected


def test_bad_environment_value_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(host_memory.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match=r"MIXQ_KEEP_FREED_MEMORY='maybe'.*1 .*0 "):
        host_memory.wanted()
