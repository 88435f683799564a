"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/train.py CATALOG [options]`.
Same options as `artnet train`; see `python jobs/train.py --help`."""

import sys

from artnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
