import sys

from sdetr.platform.cli.main import main

sys.exit(main())
