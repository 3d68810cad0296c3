"""The one-command GPU check runs its code paths on the CPU (so it cannot rot before a GPU run)."""

from __future__ import annotations

import pytest

from benchmarks import gpu


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section_on_the_cpu(capsys):
    code = gpu.main(["--device", "cpu", "--quick"])
    out = capsys.readouterr().out
    assert "FAILED" not in out, out[-3000:]
    assert code == 0
    for section in ("[parity]", "[loader]", "[decode]", "[train step]", "[ray train]"):
        assert section in out
    assert "grey levels: ok" in out and "DALI batches on the device: yes" in out
    assert "hand-over: identical pixels: yes" in out
    decode_rows = [line for line in out.splitlines() if line.startswith("[decode] hw_decoder_load")]
    assert len(decode_rows) == 3
