"""The one definition of pwdaemon's Grafana dashboards; the JSON files are generated.

    python grafana/build_dashboards.py           # rewrite grafana/dashboards/*.json
    python grafana/build_dashboards.py --check   # exit 1 if the committed JSON is stale

Edit the panels in `_serving_panels.py` and `_service_panels.py` (built with
`_kit.py`), never in the JSON (or in Grafana's UI followed by an export): the JSON is
committed so it can be provisioned or imported without running Python, and
tests/tooling/test_grafana.py checks it matches these files and that every query names
a metric pwdaemon actually exports.

Conventions every panel follows (the tests enforce them):
- the data source is the `datasource` template variable, `${datasource}`, so one
  dashboard works against any Prometheus without an import-time `DS_...` input;
- every query filters on the `job`, `instance` and (where the metric has it) `model`
  variables;
- counters go through rate()/increase() over `$__rate_interval`, which Grafana keeps at
  least four scrape intervals long, so a panel never shows gaps at a short zoom;
- every panel has a unit and a description.
Stdlib only: it must run wherever the repository is checked out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

# Siblings, found on sys.path[0] (this folder) when run as a script; the tests put the
# folder there before they load this file.
from _kit import Json
from _service_panels import service_dashboard
from _serving_panels import serving_dashboard

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"

DASHBOARDS: dict[str, Callable[[], Json]] = {
    "pwdaemon.json": serving_dashboard,
    "pwdaemon-service.json": service_dashboard,
}


def render(dash: Json) -> str:
    return json.dumps(dash, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if any committed dashboard differs from this file",
    )
    parser.add_argument("--out", type=Path, default=DASHBOARD_DIR, help="dashboards folder")
    args = parser.parse_args(argv)
    stale: list[str] = []
    for name, build in DASHBOARDS.items():
        path: Path = args.out / name
        text = render(build())
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(
            "stale dashboards (run `python grafana/build_dashboards.py`): " + ", ".join(stale),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
