"""The package, the op registry and the CLI: what every kernel family stands on."""
import json
import os
import subprocess
import sys

import pytest
import torch

import flashseek
from flashseek import ops


def _schema_op_names():
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("flashseek::"))


def test_every_schema_has_reference_and_fake():
    """Each op defined in csrc/torch_bindings.cpp is registered in ops.py with a CPU reference and a
    fake implementation; an op added to the bindings without them fails here."""
    schemas = _schema_op_names()
    assert schemas, "no flashseek ops registered: is flashseek._C loaded?"
    assert sorted(ops.OP_NAMES) == schemas
    for name in schemas:
        qual = f"flashseek::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "Meta") or \
            torch._library.simple_registry.singleton.find(qual).fake_impl.kernel is not None, name


def test_namespace_lists_every_op():
    assert sorted(torch.ops.flashseek) == _schema_op_names()


def test_op_backends_reports_every_op():
    backends = flashseek.op_backends()
    assert set(backends) == set(ops.OP_NAMES)
    assert set(backends.values()) <= {"kernel", "reference"}
    if not flashseek.built_with_cuda():
        assert set(backends.values()) == {"reference"}


def test_wrong_dtype_device_and_shape_errors_name_the_argument():
    x = torch.randn(4, 256)  # fp32: not accepted
    with pytest.raises(ValueError, match=r"x must have dtype torch.bfloat16 or torch.float16, got torch.float32"):
        ops.quant_fp8_1x128(x)
    x = torch.randn(4, 200, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"x's last dimension must be a multiple of 128, got 200"):
        ops.quant_fp8_1x128(x)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    bad_out = torch.empty(4, 128, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"out must have shape \[4, 256\], got \[4, 128\]"):
        ops.quant_fp8_1x128(x, out=bad_out)
    row_major_scale = torch.empty(4, 2)
    with pytest.raises(ValueError, match=r"scale must be column-major"):
        ops.quant_fp8_1x128(x, scale=row_major_scale)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"must be on x's device"):
            ops.quant_fp8_1x128(x, out=torch.empty(4, 256, dtype=torch.float8_e4m3fn, device="cuda"))


def test_fullgraph_compile_traces_ops():
    """The fake implementations let torch.compile(fullgraph=True) trace through the ops."""
    def step(x):
        q, s = ops.quant_fp8_1x128(x)
        return q.float() * s.repeat_interleave(128, dim=1)

    x = torch.randn(8, 256, dtype=torch.bfloat16)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), step(x))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flashseek.cli.main", *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_info_lists_ops():
    r = _cli("info")
    assert r.returncode == 0, r.stderr
    for name in ops.OP_NAMES:
        assert f"torch.ops.flashseek.{name}" in r.stdout


def test_cli_bench_writes_json_and_roofline(tmp_path):
    out = tmp_path / "bench.json"
    png = tmp_path / "roofline.png"
    r = _cli("bench", "quant", "--quick", "--device", "cpu", "--json", str(out), "--roofline", str(png))
    assert r.returncode == 0, r.stderr + r.stdout
    doc = json.loads(out.read_text())
    assert doc["card"] == "cpu" and doc["commit"] and doc["ceilings"]["copy_tbps"] > 0
    assert doc["rows"], "the quant benchmark produced no rows"
    for row in doc["rows"]:
        assert row["us"] > 0 and row["bytes"] > 0 and row["family"] == "quant"
    assert png.stat().st_size > 1000


def test_bench_gpu_state_sampling(tmp_path, monkeypatch):
    """Bench rows carry the SM clock / power / throttle reasons that nvidia-smi reports right after their
    timings; a missing or failing nvidia-smi gives no state (and is not asked again), never an error."""
    from types import SimpleNamespace

    from flashseek.bench import common

    line = "1305, 1980, 697.22, 700.00, 67, 0x0000000000000004"
    assert common.parse_gpu_state(line) == {"sm_clock_mhz": 1305.0, "max_sm_clock_mhz": 1980.0, "power_w": 697.22,
                                            "power_limit_w": 700.0, "temp_c": 67.0,
                                            "clock_event_reasons": "0x0000000000000004"}
    assert common.parse_gpu_state("1305, 1980, 697.22") is None
    assert common.parse_gpu_state("[N/A], 1980, 697.22, 700.00, 67, 0x4") is None

    fake = tmp_path / "nvidia-smi"
    fake.write_text(f'#!/bin/sh\necho "{line}"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(common, "_gpu_state_disabled", False)
    if not torch.cuda.is_initialized():  # a process that has not used CUDA asks nobody
        assert common.sample_gpu_state() is None and not common._gpu_state_disabled
    monkeypatch.setattr(common.torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(common.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(common.torch.cuda, "get_device_properties", lambda d: SimpleNamespace(uuid="abc"))
    assert common.sample_gpu_state()["sm_clock_mhz"] == 1305.0
    row = common.Row("gemm", "x", {}, 10.0, 1.0, 1.0)
    assert row.extra["gpu_state"]["power_w"] == 697.22
    assert "gpu_state" not in common.Row("gemm", "x", {}, 10.0, 1.0, 1.0, backend="reference").extra

    fake.write_text("#!/bin/sh\nexit 9\n")
    assert common.sample_gpu_state() is None
    fake.write_text(f'#!/bin/sh\necho "{line}"\n')
    assert common.sample_gpu_state() is None  # disabled after the first failure


def test_mla_bench_external_flashmla_peer(tmp_path, monkeypatch):
    """The MLA bench's standalone-FlashMLA peer hook: parses the binary's timing line, passes the
    row's shape (a varlen row: varlen=1, s_k = the longest length, and the lengths themselves in
    FLASHMLA_BENCH_SEQLENS), and reports no peer (rather than failing) for a missing or failing binary."""
    from flashseek.bench import mla as bench_mla

    exe = tmp_path / "fake_flashmla"
    # Exits 4 unless a varlen call carries exactly the row's lengths with s_k = their maximum.
    exe.write_text('#!/bin/sh\n[ "$1" = 128 ] || exit 3\n'
                   'if [ "$5" = 1 ]; then [ "$3" = 9000 ] && [ "$FLASHMLA_BENCH_SEQLENS" = "5,9000,77" ] || exit 4; '
                   'echo "fake: 301.5 us"; exit 0; fi\n'
                   '[ -z "$FLASHMLA_BENCH_SEQLENS" ] || exit 5\n'
                   'echo "fake b=$1 sq=$2 sk=$3 hq=$4 varlen=$5 causal=$6 fp8=$7 page=$8 P=66: 252.4 us  579 TFLOP/s"\n')
    exe.chmod(0o755)
    monkeypatch.setenv("FLASHSEEK_FLASHMLA_BENCH", str(exe))
    monkeypatch.delenv("FLASHMLA_BENCH_SEQLENS", raising=False)
    assert bench_mla._external_peer_us(128, 1, 4096, 128, False) == 252.4
    assert bench_mla._external_peer_us(128, 1, 4096, 128, False, lens=[5, 9000, 77]) == 301.5
    assert bench_mla._external_peer_us(128, 1, 4096, 128, False, lens=[5, 9000, 78]) is None
    assert bench_mla._external_peer_us(64, 1, 4096, 64, False) is None  # the binary exits non-zero
    monkeypatch.setenv("FLASHSEEK_FLASHMLA_BENCH", str(tmp_path / "missing"))
    assert bench_mla._external_peer_us(128, 1, 4096, 128, False) is None
    monkeypatch.delenv("FLASHSEEK_FLASHMLA_BENCH")
    assert bench_mla._external_peer_us(128, 1, 4096, 128, False) is None
