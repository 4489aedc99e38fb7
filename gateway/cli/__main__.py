"""`python -m gateway.cli`: the `bastion` command."""

import sys

from gateway.cli import main

sys.exit(main())
