"""``python -m layerwise`` == the ``layerwise`` console script (torchrun needs the module form)."""

from layerwise.lab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
