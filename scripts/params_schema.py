"""params.schema.json is generated from cnnpipe's config dataclasses (cnnpipe.config.params_schema):
params.yaml's first line points editors at it.

    python scripts/params_schema.py            # rewrite params.schema.json
    python scripts/params_schema.py --check    # exit 1 when it is not what the dataclasses make
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cnnpipe.config import params_schema

SCHEMA = Path(__file__).resolve().parent.parent / "params.schema.json"


def render() -> str:
    return json.dumps(params_schema(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--check", action="store_true", help="only check that the committed schema is up to date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if SCHEMA.read_text() != text:
            print(f"{SCHEMA.name} is stale: run python scripts/params_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(text)
    print(json.dumps({"written": SCHEMA.name}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
