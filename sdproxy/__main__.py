"""``python -m sdproxy``: the same as the ``sdproxy`` command."""

from __future__ import annotations

import sys

from sdproxy.cli import main

sys.exit(main())
