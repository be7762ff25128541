"""Ray job: `metaaligner serve --config ...`."""

from jobs import entrypoint

if __name__ == "__main__":
    entrypoint("serve")
