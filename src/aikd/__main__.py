"""``python -m aikd`` (also what ``torchrun -m aikd train ...`` runs)."""

from aikd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
