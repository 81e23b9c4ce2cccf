import sys

from ipmn.cli import main

if __name__ == "__main__":
    sys.exit(main())
