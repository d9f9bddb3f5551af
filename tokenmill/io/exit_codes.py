"""Exit codes of `tokenmill generate` and `tokenmill merge` (documented in the README)."""

OK = 0  # every row produced a result
ROW_ERRORS = 1  # finished; some rows are error rows (see the report and OUTPUT.errors.jsonl)
USAGE = 2  # bad command line (Typer's own code for a bad option)
CANNOT_RUN = 3  # could not run: unreadable input, model failed to load, resume refused, ...
FAIL_FAST = 4  # --fail-fast stopped at the first bad row
MERGE_MISMATCH = 5  # merge: rows missing or duplicated across the shard outputs
LOCKED = 6  # another run is writing the same output (its pid and host are in the message)
INTERRUPTED = 130  # Ctrl-C / SIGTERM: stopped cleanly; rerun the same command to resume
