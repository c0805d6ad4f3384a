"""`python -m maisi_cli …` (also what `torchrun -m maisi_cli` runs)."""

from maisi_cli.cli.app import main

if __name__ == "__main__":
    main()
