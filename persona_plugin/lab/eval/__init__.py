"""Evaluations: LoCoMo recall of evidence turns (:mod:`.locomo`), fact extraction
(:mod:`.facts`)."""
