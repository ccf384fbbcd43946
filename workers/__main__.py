import sys

from workers.training.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["train"]:
        argv = argv[1:]
    sys.exit(main(["--no-ray", *argv], prog="python -m workers train"))
