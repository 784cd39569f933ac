"""``python -m maskalign``: the ``maskalign`` command line (:mod:`maskalign.repro.cli`)."""

if __name__ == "__main__":
    from .repro.cli import main

    raise SystemExit(main())
