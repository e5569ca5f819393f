"""How long loading a bundle keeps a serving thread from running (GIL stalls during a swap).

A worker loads a new champion in a background thread while its event loop goes on serving;
any call that holds the GIL for long (a pickle load, a big list-to-array conversion, a
pure-C loop that does not release it) stalls every request of that worker. This loads the
champion of a benchmark home twice -- the first time as at start (query encoder included),
the second as on a swap (encoder shared) -- plus the warm-up, in a background thread, while
the main thread ticks every millisecond; it prints the longest gaps between ticks and what
the loading thread was running when each gap ended.

    .venv/bin/python benchmarks/load_stalls.py \
        --home state/bench-serving/p100000-u50000-d14-seed7-minilm

(the home ``make bench-serving`` builds). Needs the setup done.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))


def where(thread_id: int) -> str:
    """Where the loading thread is (``serving.watchdog.where``: its innermost frames, then
    ours)."""
    from serving.watchdog import where as frame_where

    frame = sys._current_frames().get(thread_id)
    return "(done)" if frame is None else frame_where(frame)


def watch(label: str, work, top: int) -> None:  # noqa: ANN001
    done = threading.Event()
    loader = threading.Thread(target=lambda: (work(), done.set()), daemon=True)
    gaps: list[tuple[float, str]] = []
    started = time.perf_counter()
    loader.start()
    last = time.perf_counter()
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        if now - last > 0.02:
            gaps.append((now - last, where(loader.ident)))
        last = now
    loader.join()
    total = time.perf_counter() - started
    gaps.sort(reverse=True)
    print(f"\n{label}: {total:.1f} s; gaps > 20 ms: {len(gaps)}, "
          f"summing {sum(g for g, _ in gaps):.2f} s; longest:")
    for gap, at in gaps[:top]:
        print(f"  {gap * 1e3:7.1f} ms  ended in {at}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--as-shipped", action="store_true",
                        help="load as BundleSlot.load does (serving.runtime.no_gc_pauses, "
                             "short GIL slices on the swap); default: a plain load")
    args = parser.parse_args(argv)
    sys.path.insert(1, str(PROJECT_ROOT / "benchmarks"))
    from _serving_setup import use_state

    settings = use_state(args.home.resolve(), args.encoder)
    from serving.publish import load_version_bundle
    from serving.runtime import ThreadLimits, no_gc_pauses, short_gil_slices, warm

    ThreadLimits(1)  # as a worker serves
    box: dict[str, object] = {}
    def load(name: str, swap: bool) -> None:
        if not args.as_shipped:
            box[name] = load_version_bundle(settings)
            return
        with no_gc_pauses(), short_gil_slices() if swap else contextlib.nullcontext():
            box[name] = load_version_bundle(settings)

    watch("first load (as at start)", lambda: load("first", False), args.top)
    watch("second load (as on a swap)", lambda: load("second", True), args.top)
    watch("warm-up of the swapped bundle", lambda: warm(box["second"]), args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
