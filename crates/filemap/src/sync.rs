//! Placeholder: atomics and locks, switched to loom under `--cfg loom`.
