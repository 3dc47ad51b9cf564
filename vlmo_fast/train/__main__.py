from . import main

raise SystemExit(main(prog="python -m vlmo_fast.train"))
