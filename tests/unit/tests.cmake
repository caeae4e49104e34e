# One line per unit test; the name is the file tests/unit/<name>.c.
