"""`python -m cpcli`: the same entry point as the `cp` command."""

from cpcli.cli import main

if __name__ == "__main__":
    main()
