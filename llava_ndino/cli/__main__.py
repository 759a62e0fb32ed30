"""``python -m llava_ndino.cli``: the same as the ``ndino`` console script."""

import sys

from llava_ndino.cli import main

sys.exit(main())
