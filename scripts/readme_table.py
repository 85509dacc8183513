"""Put the lab's findings table into README.md, from a results.json of a full-profile run.

Usage::

    batchnorm lab --profile full --out lab-full
    python scripts/readme_table.py lab-full/results.json [--readme README.md]

Replaces the text between ``<!-- lab-results:start -->`` and ``<!-- lab-results:end -->``
in the README with the table of ``batchnorm.lab.summary.markdown_table``. Results of
another profile are refused unless ``--any-profile`` is given (the README reports the full
profile).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from batchnorm.lab import results
from batchnorm.lab.store import write_atomic
from batchnorm.lab.summary import markdown_table, replace_block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_json", type=Path, help="results.json written by `batchnorm lab`")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parent.parent / "README.md",
                        help="the README to update (default: the project's README.md)")
    parser.add_argument("--any-profile", action="store_true", help="accept results of a profile other than full")
    args = parser.parse_args(argv)
    try:
        found = results.read(args.results_json)
        if found.get("profile") != "full" and not args.any_profile:
            raise ValueError(f"{args.results_json} is from the {found.get('profile')!r} profile; the README reports "
                             "the full profile (run `batchnorm lab --profile full`, or pass --any-profile)")
        text = replace_block(args.readme.read_text(), markdown_table(found))
    except (OSError, ValueError, KeyError) as e:
        print(f"readme_table: error: {e}", file=sys.stderr)
        return 2
    write_atomic(args.readme, text)
    print(f"updated {args.readme} from {args.results_json} ({len(found['claims'])} claims)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
