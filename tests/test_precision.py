"""Precision by what the hardware computes natively, read from this machine's own CPU (and GPU, where it has one)."""

import shutil
import subprocess

import pytest

from pipeline.hardware import cpu_flags, cpu_model, gpu_capability, gpu_half_precision, native_bf16
from pipeline.label.plan import choose_precision


def test_auto_takes_bf16_only_where_it_is_native_and_a_forced_precision_stays():
    flag = native_bf16()
    if flag:
        assert choose_precision("auto", gpu=False) == ("bf16", f"this CPU computes bf16 natively ({flag})")
    else:
        assert choose_precision("auto", gpu=False) == ("fp32", "this CPU has no native bf16 (no avx512_bf16 or "
                                                               "amx_bf16), where bf16 runs several times slower")
    precision, why = gpu_half_precision(gpu_capability())  # bf16 from sm_80 on (tests/test_gpu_paths.py)
    assert choose_precision("auto", gpu=True) == (precision, f"GPU actors autocast: {why}")
    assert choose_precision("bf16", gpu=False) == ("bf16", "--precision")
    assert choose_precision("fp32", gpu=True) == ("fp32", "--precision")
    assert ("no native bf16" in cpu_model()) == (flag is None)


@pytest.mark.skipif(not shutil.which("lscpu"), reason="lscpu (util-linux) is not installed here")
def test_cpu_flags_are_the_ones_lscpu_reports():
    lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("Flags:")), None)
    if flags is None:
        pytest.skip("lscpu lists no flags on this architecture")
    assert cpu_flags() == frozenset(flags)
