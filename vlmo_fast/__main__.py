"""``python -m vlmo_fast``: the ``vlmo-fast`` command (vlmo_fast.cli)."""

from .cli import main

if __name__ == "__main__":  # (not when a spawned worker imports this module as __mp_main__)
    raise SystemExit(main())
