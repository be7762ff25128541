"""Ray job: `metaaligner pipeline --config ...`."""

from jobs import entrypoint

if __name__ == "__main__":
    entrypoint("pipeline")
