"""Ray job: `metaaligner train --config ...`."""

from jobs import entrypoint

if __name__ == "__main__":
    entrypoint("train")
