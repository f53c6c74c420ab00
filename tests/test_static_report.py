"""The SASS reader of ``benchmarks/static_report.py`` on a hand-written function: widths, MMA shapes, loops, fp64.

It runs in a subprocess: importing the report imports the compile check, which removes TRITON_INTERPRET from the
environment (conftest.py set it for this process). No compile, so it takes seconds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Addresses in hex as cuobjdump prints them; one outer loop (0x30..0xc0) around an inner one (0x50..0x90), a
# predicated backward branch, and the EXIT + self-branch every function ends with (not a loop).
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0020*/                   LDG.E.U16 R8, desc[UR6][R2.64] ;
        /*0030*/                   DFMA R10, R10, R12, R14 ;
        /*0040*/                   F2F.F64.F32 R12, R9 ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], R88 ;
        /*0080*/                   NOP ;
        /*0090*/              @!P0 BRA.U !UP0, 0x50 ;
        /*00a0*/                   MUFU.EX2 R3, R3 ;
        /*00b0*/                   STG.E.128 desc[UR6][R2.64], R4 ;
        /*00c0*/               @P1 BRA 0x30 ;
        /*00d0*/                   STG.E desc[UR6][R2.64], R5 ;
        /*00e0*/                   EXIT ;
        /*00f0*/                   BRA 0xf0;
"""


def test_sass_metrics_of_a_known_function():
    code = ("import json, sys; from dataclasses import asdict; from benchmarks.static_report import sass_metrics; "
            "print(json.dumps(asdict(sass_metrics(sys.stdin.read()))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], input=SASS, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["instructions"] == 15                       # NOP left out
    assert metrics["loads"] == {"128": 1, "16": 1}
    assert metrics["stores"] == {"128": 1, "32": 1}
    assert metrics["mma"] == {"HGMMA.64x128x16": 1, "HGMMA.64x64x16": 1}
    assert metrics["fp64"] == 2 and metrics["mufu"] == 1
    assert metrics["loops"] == 2
    # The main loop is the innermost one: 0x50..0x90, 4 instructions without the NOP, one barrier.
    assert (metrics["loop_instructions"], metrics["loop_barriers"]) == (4, 1)
