"""python -m sidecar → cli.main()."""

import sys

from sidecar.cli import main

sys.exit(main())
