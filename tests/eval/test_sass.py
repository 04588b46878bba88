"""eval/sass.py: loop bodies of an nvdisasm listing (what compile_kernels.py reports per loop)."""

from eval.sass import LOOP_OPCODES, sass_loops

# nvdisasm's shape: labels on their own lines, instructions as /*address*/ text ;
LISTING = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   STS.U16 [R2], R3 ;
        /*0020*/                   STS.U16 [R2+0x2], R4 ;
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0040*/               @P0 BRA `(.L_x_0) ;
        /*0050*/                   BRA `(.L_x_1) ;
.L_x_2:
        /*0060*/                   STS.128 [R2], R4 ;
        /*0070*/                   IMAD.MOV.U32 R5, RZ, RZ, R6 ;
        /*0080*/              @!P1 BRA `(.L_x_2) ;
.L_x_1:
        /*0090*/                   EXIT ;
"""


def test_loops_are_spans_of_backward_branches():
    loops = sass_loops(LISTING)
    # Two loops (the forward branch to .L_x_1 is not one), each counted from its label to its branch.
    assert [loop["instructions"] for loop in loops] == [4, 3]
    assert loops[0]["STS.U16"] == 2 and loops[0]["BAR.SYNC.DEFER_BLOCKING"] == 1 and loops[0]["STS.128"] == 0
    assert loops[1]["STS.128"] == 1 and loops[1]["IMAD.MOV.U32"] == 1 and loops[1]["STS.U16"] == 0
    assert set(LOOP_OPCODES) <= loops[0].keys()
    # Every opcode with its suffixes, most frequent first (the predicate is not part of it).
    assert list(loops[0]["opcodes"].items()) == [("STS.U16", 2), ("BAR.SYNC.DEFER_BLOCKING", 1), ("BRA", 1)]


def test_no_loops():
    assert sass_loops("        /*0000*/                   EXIT ;\n") == []
