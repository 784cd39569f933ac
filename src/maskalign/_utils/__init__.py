"""Small helpers shared by the library's concepts (not public API): model
modes (``modes``), model inputs (``inputs``), atomic file writes (``fileio``)."""
