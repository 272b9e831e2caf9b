"""Allow ``python -m xpdeploy.cli`` (as the former single-module ``cli.py`` did)."""

from xpdeploy.cli import main

if __name__ == "__main__":
    main()
