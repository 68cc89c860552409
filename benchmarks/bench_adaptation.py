"""What slow adaptation costs: a user's own preference model and adapter, trained and gated.

Simulated users expand every short reply they get (an edit per turn: the long reply beats
the short one, and the long reply is an endorsed example), on a real SQLite log. Measured:

* ``adapt_preference_model`` per user (pairs from the log, training, the gate), median over
  the users, against the baseline of scoring one turn's 4 MBR candidates with the bundled
  models (the per-turn cost the trained model adds to);
* ``adapt_adapter`` for one user with 32 endorsed replies on the local model (rank 4,
  float16, :func:`training_steps` steps), wall and CPU seconds, against the baseline of one
  local-model reply of 40 tokens measured in the same run.

``--quick`` (the test suite's smoke run): 2 users, and the adapter on 8 replies, 4 steps.
Prints the machine's load average: numbers from a busy machine are slower.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from persona_plugin.adaptation import adapt_preference_model
from persona_plugin.adaptation.adapter import adapt_adapter
from persona_plugin.backends.local import LocalBackend
from persona_plugin.backends.types import GenerationRequest
from persona_plugin.cards.owned import OwnedCards
from persona_plugin.interactions import InteractionLog
from persona_plugin.lora.hub import LoraHub
from persona_plugin.preferences.hub import PreferenceHub
from persona_plugin.preferences.mbr import MBRSelector
from persona_plugin.store import PersonaStore

TOPICS = [
    "boil an egg",
    "name a cat",
    "back up a laptop",
    "keep plants alive",
    "sleep better",
    "pack for a hike",
    "type faster",
    "clean a cast iron pan",
    "find a cheap hobby",
    "start running",
    "store coffee beans",
    "remember names",
    "fix a squeaky door",
    "learn a language",
    "save money",
    "write a cover letter",
    "cook rice",
    "stretch",
    "plan a trip",
    "choose a laptop",
    "make tea",
    "study for exams",
    "paint a room",
    "train a puppy",
    "fold a shirt",
    "grow tomatoes",
    "bake bread",
    "meditate",
    "sharpen a knife",
    "tidy a desk",
    "water a lawn",
    "change a tyre",
    "iron a shirt",
]


def short_reply(topic: str) -> str:
    return f"To {topic}, start small and keep at it."


def long_reply(topic: str) -> str:
    return (
        f"To {topic}, start small and keep at it. It helps to set aside a regular time, "
        "gather what you need beforehand, and check your progress every week, adjusting "
        "what does not work. Ask someone who has done it for a tip or two along the way."
    )


def simulate(log: InteractionLog, user: str, turns: int) -> None:
    for n in range(turns):
        topic = TOPICS[n % len(TOPICS)]
        turn = f"{user}-{n}"
        log.record_turn(user, turn, user_text=f"How do I {topic}?", reply_text=short_reply(topic))
        log.record_feedback(user, turn, "edit", text=long_reply(topic), reflect=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    parser.add_argument("--users", type=int, default=10)
    args = parser.parse_args(argv)
    users = 2 if args.quick else args.users
    examples, steps = (8, 4) if args.quick else (32, None)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = PersonaStore(f"sqlite:///{root / 'personas.db'}")
        log = InteractionLog.on(store)
        owned = OwnedCards(root / "owned")
        hub = PreferenceHub(root / "prefs", owned=owned)
        hub.load()

        # baseline: scoring one turn's 4 candidates with the bundled models
        selector = MBRSelector(hub)
        candidates = [short_reply("cook pasta"), long_reply("cook pasta"), "Boil it.", "Hi!"]
        mixture = {"brevity": 0.5, "formality": 0.3, "warmth": 0.2}
        selector.select("How do I cook pasta?", candidates, mixture)  # warm the embedder
        scoring = []
        for n in range(20):
            started = time.perf_counter()
            selector.select(
                f"How do I cook pasta {n}?", [f"{c} ({n})" for c in candidates], mixture
            )
            scoring.append(time.perf_counter() - started)

        pref_seconds, statuses = [], []
        for i in range(users):
            user = f"user{i:02d}"
            simulate(log, user, 14)
            started = time.perf_counter()
            result = adapt_preference_model(user, log=log, hub=hub, store=store)
            pref_seconds.append(time.perf_counter() - started)
            statuses.append(result.status)
        base_turn = statistics.median(scoring)
        pref = statistics.median(pref_seconds)
        print(
            f"preference model per user: median {pref:.3f} s over {users} users (14 pairs "
            f"each), {statuses.count('promoted')} promoted; one turn's MBR scoring "
            f"{1000 * base_turn:.1f} ms; ratio {pref / base_turn:.0f}x"
        )

        backend = LocalBackend(lora_hub=LoraHub(root / "lora", owned=owned)).load()
        request = GenerationRequest(
            messages=({"role": "user", "content": "How do I cook pasta?"},),
            max_new_tokens=40,
            temperature=0.0,
        )
        backend.generate(request)  # warm
        started = time.perf_counter()
        backend.generate(request)
        reply = time.perf_counter() - started
        simulate(log, "adapter-user", examples)
        wall, cpu = time.perf_counter(), time.process_time()
        result = adapt_adapter(
            "adapter-user",
            log=log,
            backend=backend,
            store=store,
            min_examples=examples,
            steps=steps,
            embeddings=hub.embeddings,
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        figures = result.figures
        print(
            f"adapter on {figures['examples']} endorsed replies ({figures['steps']} steps on "
            f"{figures['train_examples']}): {wall:.1f} s wall, {cpu:.1f} s CPU "
            f"({cpu / 60:.2f} CPU-minutes), {result.status}; loss held out "
            f"{figures['heldout_loss']:.3f} vs serving {figures['serving_loss']:.3f}; one "
            f"40-token reply {reply:.2f} s; ratio {wall / reply:.0f}x"
        )
        store.close()


if __name__ == "__main__":
    main()
