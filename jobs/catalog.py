"""Ray job entrypoint: `ray job submit -- python jobs/catalog.py SOURCE --out DIR [options]` (as `artnet catalog`)."""

import sys

from artnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["catalog", *sys.argv[1:]]))
