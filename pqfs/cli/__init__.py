"""The `pqfs` command: parses, prompts, prints and maps errors; the work is done below it."""
