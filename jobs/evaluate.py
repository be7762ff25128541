"""Ray job: `metaaligner evaluate --config ...`."""

from jobs import entrypoint

if __name__ == "__main__":
    entrypoint("evaluate")
