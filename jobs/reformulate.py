"""Ray job: `metaaligner reformulate --config ...`."""

from jobs import entrypoint

if __name__ == "__main__":
    entrypoint("reformulate")
