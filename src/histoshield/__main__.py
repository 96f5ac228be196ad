"""`python -m histoshield` runs the CLI (also the entry point for torchrun)."""

from histoshield.cli import main

if __name__ == "__main__":
    main()
