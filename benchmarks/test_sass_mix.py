"""The SASS instruction-mix reader of benchmarks/aot_check.py on a hand-written listing: the main
loop is the loop with the most tensor-core work of its own (nested loops excluded), the first on a
tie; counts and per-element figures follow from it."""
from __future__ import annotations

from benchmarks import aot_check as aot

_LISTING = """
        code for sm_90
                Function : _fwd_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ ;
        /*0040*/                   FFMA R5, R6, R7, R8 ;
        /*0050*/                   MUFU.EX2 R9, R5 ;
        /*0060*/               @P0 BRA 0x20 ;
        /*0070*/                   NOP ;
        /*0080*/                   HMMA.16816.F32.BF16 R10, R12, R14, R10 ;
        /*0090*/                   UTMALDG.2D [UR4], [UR6] ;
        /*00a0*/              @!P1 BRA 0x80 ;
        /*00b0*/                   EXIT ;
"""


def test_main_loop_is_the_one_with_the_most_tensor_core_work():
    mix = aot.sass_mix(_LISTING, {"BLOCK_M": 64, "BLOCK_N": 64}, 4, "_fwd_kernel")
    # loop 0x20..0x60: 5 instructions, one 64x64x16 wgmma; loop 0x80..0xa0: one 16x8x16 mma.sync
    assert mix["loop_insts"] == 5 and mix["loop_macs"] == 64 * 64 * 16
    assert (mix["wgmma"], mix["mma.sync"], mix["TMA load"], mix["cp.async"]) == (1, 0, 0, 1)
    assert mix["per_elem"] == round(5 * 4 * 32 / (64 * 64), 2)


def test_nested_loop_bodies_are_not_counted_in_the_outer_loop():
    loops = aot.sass_loops(aot.parse_sass(_LISTING.replace("@!P1 BRA 0x80", "@!P1 BRA 0x10")))
    outer = next(lp for lp in loops if lp["lo"] == 0x10)
    assert outer["parent"] is None and len(outer["own"]) == 4  # 0x10, 0x80, 0x90, 0xa0 (the NOP is not counted)
    inner = next(lp for lp in loops if lp["lo"] == 0x20)
    assert inner["parent"] is outer
