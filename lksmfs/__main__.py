"""`python -m lksmfs`: the `lksmfs` command."""

import sys

from lksmfs.cli import main

sys.exit(main())
