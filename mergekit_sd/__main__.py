import sys

from mergekit_sd.cli.main import main

sys.exit(main())
