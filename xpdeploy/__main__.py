"""Allow ``python -m xpdeploy`` (and ``torchrun -m xpdeploy``) as well as the console script."""

from xpdeploy.cli import main

if __name__ == "__main__":
    main()
