"""The cohort, the last stage: statistics over all subjects (:mod:`.statistics`), figures and QC montages
(:mod:`.figures`) and the report's table views (:mod:`.report_tables`).
"""
