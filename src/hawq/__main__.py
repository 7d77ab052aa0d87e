"""``python -m hawq``: the ``hawq`` command line (:func:`hawq.ui.cli.main`)."""

import sys

from hawq.ui.cli import main

if __name__ == "__main__":
    sys.exit(main())
