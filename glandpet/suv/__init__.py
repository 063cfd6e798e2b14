"""SUV, the second stage: the factors a PET header supports (:mod:`.factors`, QIBA/IBSI rules) and the SUV image
(:mod:`.image`).
"""
