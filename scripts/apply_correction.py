"""Snakemake wrapper: a session's corrected labels into results (its own correction, or the reference session's carried)."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import corrections  # noqa: E402
from glandpet import workflow as wf  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    if "correction" in sm.input.keys():
        corrections.apply_correction(sm.input.correction, sm.input.ct, sm.input.atlas_dseg, sm.output.dseg,
                                     sm.output.table, sm.output.qc)
    else:
        corrections.carry_correction(sm.input.ref_dseg, sm.input.ct, str(sm.input.affine)[: -len("_xfm.mat")],
                                     sm.input.atlas_dseg, sm.output.dseg, sm.output.table, sm.output.qc)
