"""`python -m walkrank.cli` is the `walkrank` command."""

import sys

from walkrank.cli import main

sys.exit(main())
