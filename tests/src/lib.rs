//! Helpers for the end-to-end tests: locate the `adverse` binary, the repository, its data.
