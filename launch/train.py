"""torchrun entry point: ``torchrun [--nproc_per_node N] launch/train.py recipe=NAME key=value ...``.

Same arguments as ``ndino train``; works with plain ``python`` too.
"""

import sys

from llava_ndino.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
