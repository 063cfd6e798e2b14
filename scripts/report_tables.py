"""Snakemake wrapper: HTML views of the cohort tables for the report."""
import sys

sys.path.insert(0, snakemake.scriptdir + "/..")  # noqa: F821  (the package, also inside conda envs)
from glandpet import workflow as wf  # noqa: E402
from glandpet.report_tables import write_report_tables  # noqa: E402

sm = snakemake  # noqa: F821

with wf.log_to(sm.log[0]):
    write_report_tables(sm.input.gland_stats, sm.input.cohort_stats, sm.input.qc, sm.output.statistics,
                        sm.output.gland_values, sm.output.qc, outcomes=sm.input.outcomes,
                        gland_index=sm.input.gland_index, diagnostic=sm.input.diagnostic,
                        out_results=sm.output.results)
