#!/usr/bin/env python3
"""The savevm stream dissector (installed as qmon-analyze): see monitor/analyze.py.

    python scripts/analyze.py STREAM | - | --tag TAG [--snapshot-dir DIR]
                              [--hexdump | --json] [--extract DIR]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from monitor.analyze import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
