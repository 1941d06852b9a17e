"""What the stages share: data files and their checks, annotation files, judging, model actors,
the built-in world, model import and building, statistics. Not stages themselves (tests/test_layers.py)."""
