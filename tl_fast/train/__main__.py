"""``python -m tl_fast.train``: the trainer (same options as ``tl-fast train``)."""
import sys

from .main import main

if __name__ == "__main__":
    main(prog="python -m tl_fast.train")
    sys.exit(0)
