"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/predict.py [options]`.
Same options as `artnet predict`; see `python jobs/predict.py --help`."""

import sys

from artnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
