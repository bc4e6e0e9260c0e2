"""Memory bounds checked under RLIMIT_AS in a fresh process, so that a regression fails its test instead of taking
the machine (or CI) down.

    rows = bounded_json('''
        print(json.dumps(len(list(Reader().archive_members(path, set())))))
    ''', extra_bytes=768 * 2**20, setup=["import json\nfrom pipeline.formats.keys import Reader", "path = make_bomb()"])
    assert rows == 15

`setup` (imports, building inputs; a string or a list of snippets) runs first, unlimited. Then the process caps its
address space at its current virtual size (VmSize) plus `extra_bytes`, and runs `body` in the same namespace, in a
fresh `sys.executable` run from the repo root. A MemoryError, a kill (a C library's abort or segfault on a failed
allocation included) or a timeout fails the calling test with BoundExceeded, whose message says which.
run_bounded gives the CompletedProcess (check=False: whatever happened); usage(result) what the body took.

What the bound counts is address space, not resident memory, so it errs on the strict side: each thread that
starts under the limit reserves its stack (8 MiB) and glibc may reserve a 64 MiB malloc arena for it. Allocators that
reserve ahead take what the limit leaves them: measured here, pyarrow's pool, first used under the limit, failed to
start with 4 MiB to spare and took 15 MiB of 16 and 59 of 64 (while making one `pa.array` in setup reserves about
1 GiB there, outside the bound, after which arrays under it cost their size). So use pyarrow once in `setup` when
the body uses it, and take peak_rss - base_rss, not peak_vm, as what the body used. PIL decoding a 4000×4000 grey
PNG took 15.6 MiB of address space: its pixels, and little more.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs in the child: setup, then the limit, then body; MemoryError exits with its own code and line.
_DRIVER = r"""
import json, resource, sys, traceback

def _vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field + " is not in /proc/self/status")

_setup, _body, _extra = json.loads(sys.argv[1])
_ns = {"__name__": "__bounded__"}
exec(compile(_setup, "<setup>", "exec"), _ns)
_base = _vm("VmSize")
_limit = _base + _extra
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, so peak_rss below is the body's
except OSError:
    pass
_base_rss = _vm("VmRSS")
resource.setrlimit(resource.RLIMIT_AS, (_limit, _limit))
try:
    exec(compile(_body, "<body>", "exec"), _ns)
except MemoryError:
    traceback.print_exc()
    sys.stderr.write("\nMEMORY_LIMIT_EXCEEDED\n")
    sys.stderr.flush()
    sys.exit(%(oom_code)d)
sys.stdout.flush()
sys.stderr.write("\nMEMORY_LIMIT_USAGE " + json.dumps(
    {"base_vm": _base, "limit": _limit, "peak_vm": _vm("VmPeak"), "base_rss": _base_rss, "peak_rss": _vm("VmHWM")})
    + "\n")
"""

OOM_EXIT = 97  # the child's exit code for a MemoryError under the limit
_USAGE = "MEMORY_LIMIT_USAGE "


class BoundExceeded(AssertionError):
    """The snippet did not finish within its bound: a MemoryError, a kill, a timeout or an exception."""


def run_bounded(body: str, extra_bytes: int, timeout: float = 120, *, setup: str | Sequence[str] = "",
                check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `setup`, then `body` with the address space capped at what setup left plus `extra_bytes`, in a fresh
    `sys.executable` whose cwd is the repo root (so `pipeline` and `tests` import). Both are dedented; `setup` may
    be a list of snippets (shared imports, then a test's inputs), each dedented on its own.

    With `check` (the default) anything but a clean exit raises BoundExceeded, naming the cause and ending with the
    child's stderr; without it, the CompletedProcess comes back as it is (exit code OOM_EXIT for a MemoryError)."""
    setup = "\n".join(textwrap.dedent(part) for part in ([setup] if isinstance(setup, str) else setup))
    args = json.dumps([setup, textwrap.dedent(body), int(extra_bytes)])
    try:
        result = subprocess.run([sys.executable, "-c", _DRIVER % {"oom_code": OOM_EXIT}, args], cwd=REPO,
                                capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        if check:
            raise BoundExceeded(f"did not finish within {timeout:g} s under a bound of {mib(extra_bytes)}"
                                f"\n{_text(e.stderr)[-3000:]}") from None
        raise
    if check and result.returncode != 0:
        raise BoundExceeded(f"{cause(result)} under a bound of {mib(extra_bytes)}\n{result.stderr[-3000:]}")
    return result


def bounded_json(body: str, extra_bytes: int, timeout: float = 120, *, setup: str | Sequence[str] = "",
                 env: dict | None = None):
    """run_bounded, checked, and the last line the body printed to stdout, parsed as JSON."""
    result = run_bounded(body, extra_bytes, timeout, setup=setup, env=env)
    lines = result.stdout.strip().splitlines()
    if not lines:
        raise BoundExceeded(f"the body printed nothing to stdout\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def usage(result: subprocess.CompletedProcess) -> dict | None:
    """What a finished run used, in bytes: base_vm (the address space setup left), limit, peak_vm (the process's
    peak address space, setup's included), base_rss (resident memory when the body began) and peak_rss (the most
    resident while the body ran). peak_rss - base_rss is what the body took. None if it did not finish."""
    for line in reversed(result.stderr.splitlines()):
        if line.startswith(_USAGE):
            return json.loads(line[len(_USAGE):])
    return None


def cause(result: subprocess.CompletedProcess) -> str:
    """Why a run failed, in words."""
    code = result.returncode
    if code == OOM_EXIT and "MEMORY_LIMIT_EXCEEDED" in result.stderr:
        return "ran out of memory (MemoryError)"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        return f"was killed by {name} (a failed allocation in C code aborts or crashes this way)"
    return f"exited with code {code}"


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")
