"""Where the suite finds things, wherever a test module sits in tests/."""

from __future__ import annotations

from pathlib import Path

#: the repository root
REPO = Path(__file__).resolve().parent.parent
#: tests/data: documents the tests read
DATA = REPO / "tests" / "data"
#: ../shared beside the clone: API specs and benchmark data (read-only)
SHARED = REPO.parent / "shared"
#: the suite's model cache (PERSONA_CACHE_DIR in every test): built models kept across runs
MODEL_CACHE = REPO / ".cache" / "test"
