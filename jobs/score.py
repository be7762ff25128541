"""Ray job: `metaaligner score --config ...`."""

from jobs import entrypoint

if __name__ == "__main__":
    entrypoint("score")
