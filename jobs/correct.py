"""Ray job: `metaaligner correct --config ...`."""

from jobs import entrypoint

if __name__ == "__main__":
    entrypoint("correct")
