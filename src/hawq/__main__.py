"""``python -m hawq``: the ``hawq`` command line (:func:`hawq.cli.main`)."""

import sys

from hawq.cli import main

if __name__ == "__main__":
    sys.exit(main())
