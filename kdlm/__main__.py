"""`python -m kdlm` is the `kdlm` command."""

import sys

from kdlm.cli import main

sys.exit(main())
