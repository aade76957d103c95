"""Reading the CPU's 8-bit dot-product support from /proc/cpuinfo-style text (real excerpts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.cpu_features import has_int8_dot_product

SAPPHIRE_RAPIDS = (
    "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_int8\n"
)
ALDER_LAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx_vnni\n"
EPYC_ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 fma avx2 f16c rdrand hypervisor\n"
GRAVITON2 = (
    "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp\n"
)
CORTEX_A72 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SAPPHIRE_RAPIDS, True),
        (ALDER_LAKE, True),
        (EPYC_ZEN3, False),
        (GRAVITON2, True),
        (CORTEX_A72, False),
        ("processor\t: 0\nmodel name\t: unknown\n", None),  # no flags line: unknown, not "missing"
    ],
)
def test_the_flags_decide(tmp_path: Path, text: str, expected: bool | None) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text * 2, encoding="utf-8")  # one block per core, as Linux writes it
    assert has_int8_dot_product(cpuinfo) is expected


def test_no_cpuinfo_is_unknown(tmp_path: Path) -> None:
    assert has_int8_dot_product(tmp_path / "absent") is None
