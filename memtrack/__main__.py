import sys

from .cli import main

if __name__ == "__main__":  # not when a spawn or forkserver child imports the main module
    sys.exit(main())
