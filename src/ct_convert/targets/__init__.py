"""One package per target: its writer, the independent reader `verify` uses, and the facts both share."""
