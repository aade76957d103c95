"""What this CPU can do for INT8 inference: whether it has 8-bit dot-product instructions.

Why it matters: ONNX Runtime's INT8 convolutions multiply unsigned 8-bit activations by signed 8-bit weights.
With dot-product instructions (x86 AVX-512 VNNI, AVX-VNNI or AMX, ARM dotprod) the products are summed in 32
bits. Without them (AVX2-only x86 CPUs, such as AMD EPYC before Zen 4) pairs of products are summed in 16 bits
and saturate, so an INT8 model's answers drift from FP32. Measured on such a 2-core AMD EPYC with
tf_efficientnet_lite0: INT8 ran 8.0 ms against FP32's 11.5 ms at batch 1, and the export's check refused it
(5 of 6 check photos kept their top-1); the exact alternatives were no faster than FP32 (S8S8 12.6 ms) or
7x slower (U8U8 87 ms). So `--int8` says why when it is refused on such a CPU, and serving an INT8 file there
warns.
"""

from __future__ import annotations

from pathlib import Path

INT8_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})
CPUINFO = Path("/proc/cpuinfo")

NO_INT8_DOT_PRODUCT = (
    "this CPU has no 8-bit dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX or ARM dotprod), so ONNX "
    "Runtime's INT8 convolutions saturate here and INT8 answers drift from FP32"
)


def has_int8_dot_product(cpuinfo: Path = CPUINFO) -> bool | None:
    """True or False from the CPU's feature flags (Linux's /proc/cpuinfo); None where they cannot be read
    (another OS), so that callers only warn on what they know."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86 calls them flags, ARM features
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & INT8_DOT_PRODUCT_FLAGS)
