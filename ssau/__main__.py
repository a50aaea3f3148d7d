import sys

from ssau.cli import main

sys.exit(main())
