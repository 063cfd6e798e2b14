"""A study's onboarding: drafting it from a DICOM export (:mod:`.draft`, ``glandpet init``), the subject sheet
(:mod:`.subjects`), the pre-flight (:mod:`.preflight`, ``glandpet check``) and their command-line plumbing
(:mod:`.commands`).
"""
