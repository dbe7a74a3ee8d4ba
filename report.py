"""Collect reconstruction runs into the papers' tables and figures: ``python report.py DIR ...``.

``tasks.report.main`` does the work (docs/experiments.md, docs/steerable.md).
"""

import sys

from tasks.report import main

if __name__ == "__main__":
    sys.exit(main())
