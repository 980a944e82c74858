"""A serving process for the store tests: attach the small MLP to a store, serve sizes,
wait until they serve specialized, print what happened as JSON (run as a subprocess)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    store_dir, sizes_arg = sys.argv[1], sys.argv[2]
    sizes = [int(s) for s in sizes_arg.split(",")]
    go = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import SmallMLP

    import pwdaemon as pwd

    torch.manual_seed(0)
    model = SmallMLP().eval()
    if go is not None:  # start both replicas' traffic together
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    t0 = time.monotonic()
    h = pwd.attach(
        model,
        sizes=sizes,
        store=store_dir,
        policy=pwd.PolicyConfig(hot_calls=10**9, tick_s=0.02),
        compiler=pwd.CompileConfig(workers=1),
    )
    events: list[dict[str, object]] = []
    h.on_swap(
        lambda e: events.append(
            {
                "target": str(e.range) if e.range else "general",
                "source": e.source,
                "t": time.monotonic() - t0,
            }
        )
    )
    with torch.no_grad():
        ref = SmallMLP().eval()
        ref.load_state_dict(model.state_dict())
        model(torch.randn(sizes[0], 16))
        ok = h.wait(sizes=sizes, timeout=180)
        ready = time.monotonic() - t0
        # The sizes can serve specialized before the general is in: what the tests count
        # (`loads`) is read once the whole plan is done, general included (on a loaded
        # CPU, two replicas' general was still compiling when both sizes served).
        ok = h.wait(timeout=180) and ok
        max_err = 0.0
        for n in sizes:
            x = torch.randn(n, 16)
            max_err = max(max_err, float((model(x) - ref(x)).abs().max()))
    tiers = {n: h.table().lookup(n).tier.value for n in sizes}
    sources = dict(h.engine.loads_by_source)
    # Every entry's state and reason, so a failed run says why (a CI log is all we get).
    entries = [
        f"{e.target}: {e.state} ({e.reason})"
        for p in h.status().pieces
        for e in p.entries
        if e.target != "eager"
    ]
    trace = h.status().trace
    saved_trace = trace.saved_trace.value
    pieces = len(h.pieces)
    h.detach()
    print(
        json.dumps(
            {
                "ok": ok,
                "ready_s": ready,
                "events": events,
                "tiers": tiers,
                "loads": sources,
                "max_err": max_err,
                "entries": entries,
                "saved_trace": saved_trace,
                "pieces": pieces,
                # Calls pwdaemon's path raised on and the plain module answered: their
                # outputs are right, so only this count shows a broken path.
                "error_calls": trace.error_calls,
                "errors_by_type": trace.errors_by_type,
            }
        )
    )


if __name__ == "__main__":
    main()
