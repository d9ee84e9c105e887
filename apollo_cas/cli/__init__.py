"""The command line: parse, call the store, render; errors become exit codes."""
