"""Tools over the engine: lr-find, tune, bench, compare, explain, doctor."""
