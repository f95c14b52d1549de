import sys

from pqfs.cli.main import main

sys.exit(main())
