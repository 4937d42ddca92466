"""A Flower app whose ClientApp writes a file on each SuperNode (tests only)."""
