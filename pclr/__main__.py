import sys

from pclr.cli import main

sys.exit(main())
