"""Measurements on real or synthetic KBs for the CLI: search recall and write/query scale."""
