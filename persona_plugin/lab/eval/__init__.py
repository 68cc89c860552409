"""Evaluations: LoCoMo recall of evidence turns (:mod:`.locomo`), fact extraction
(:mod:`.facts`), PrefEval preference retention (:mod:`.prefeval`)."""
