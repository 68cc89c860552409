"""The scripts in examples/ run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_drop_in_chat_model_example_shows_the_injected_persona():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "drop_in_chat_model.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = result.stdout.splitlines()
    # the app's system text first, then the persona block with Alice's data
    assert lines[0] == "You are a travel assistant."
    assert "<user_profile>" in lines and "</user_profile>" in lines
    assert '- Name: "Alice"' in lines and '- Style: "concise"' in lines
