"""`python -m lksmfs.daemon MOUNTPOINT ...`: `lksmfs mount` without the CLI."""

import sys

from lksmfs.commands.mount import main

sys.exit(main())
