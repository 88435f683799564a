"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/promote.py [options]`.
Same options as `artnet promote`; see `python jobs/promote.py --help`."""

import sys

from artnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
