"""Tests of sqlite_to_databricks_uploader (stdlib unittest; run from the repo root)."""
