"""`python -m sidecar` is `litefs-sidecar`."""

import sys

from sidecar.cli import main

sys.exit(main())
