"""`python -m accelengine` is the CLI, so `accelerate launch -m accelengine run R.toml` works."""

from accelengine.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
