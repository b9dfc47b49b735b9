"""``python -m ist_optim``: the same as the ``ist-finetune`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
