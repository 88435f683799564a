"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/tune.py CATALOG [options]`.
Same options as `artnet tune`; see `python jobs/tune.py --help`."""

import sys

from artnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
