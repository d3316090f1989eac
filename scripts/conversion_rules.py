"""Write shardmerge/arch/conversion_rules.json from the installed transformers' conversion rules.

The snapshot is what shardmerge uses when transformers is not installed;
tests/test_moe_rules.py fails when it differs from the pinned transformers'
rules. Run after changing the pinned transformers version:

    PYTHONPATH=. .venv/bin/python scripts/conversion_rules.py
"""

from __future__ import annotations

import sys

from shardmerge.arch.rules import TABLE, live_table, table_as_json


def main() -> int:
    table = live_table()
    if table is None:
        print("transformers is not installed", file=sys.stderr)
        return 1
    TABLE.write_text(table_as_json(table))
    print(f"{TABLE}: {len(table)} identifiers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
